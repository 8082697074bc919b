//! Installing and registering OCI runtimes on the host: everything that changes the node.
//!
//! This tree is the only place in the crate that writes host files or restarts services,
//! and the self-test path never calls into it, so `usernsguard selftest` cannot change the
//! host it checks. Host locations and the service manager are parameters, so the logic is
//! tested against temp dirs and fakes.

pub mod download;
pub mod systemd;
