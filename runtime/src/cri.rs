//! The node's CRI runtime (containerd or CRI-O) over its socket: a small blocking client
//! ([`client`]) and the two checks that ask it what the kubelet will get ([`checks`]).

pub mod checks;
pub mod client;

use std::path::PathBuf;

use crate::host::HostRoot;

/// Sockets tried, in order, when none is given: containerd, k3s/rke2's containerd, CRI-O.
pub const KNOWN_SOCKETS: [&str; 3] = [
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/crio/crio.sock",
];

/// The first known CRI socket present on `host`, as a host path.
pub fn detect_socket(host: &HostRoot) -> Option<PathBuf> {
    KNOWN_SOCKETS
        .iter()
        .map(PathBuf::from)
        .find(|p| host.path(p).exists())
}
