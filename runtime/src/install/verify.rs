//! Whether the CRI runtime serves the handler after a restart, asked over its socket the
//! way the kubelet learns it: `Status`. containerd 2.x and CRI-O 1.30+ list each handler in
//! `runtime_handlers` with the user-namespace feature the kubelet copies into
//! `node.status.runtimeHandlers`; containerd 1.6 lists none, so its effective config
//! (`Status(verbose).info["config"].containerd.runtimes`) is read as well.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::Failure;
use crate::cri::client::CriClient;

/// The handler as the CRI runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerLive {
    pub handler: String,
    /// In `Status.runtime_handlers` (containerd 2.x, CRI-O 1.30+).
    pub listed: bool,
    /// In the effective config `Status(verbose)` returns (containerd).
    pub configured: bool,
    /// The `user_namespaces` feature advertised for it: what the kubelet sees. `None` when
    /// the runtime reports no features for it (containerd 1.6; a runtime without `features`).
    pub user_namespaces: Option<bool>,
    /// `containerd 2.1.9`, ...
    pub runtime: String,
    /// From the restart to the first answer that showed the expected state.
    pub waited: Duration,
}

impl std::fmt::Display for HandlerLive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let userns = match self.user_namespaces {
            Some(true) => "advertises user namespaces",
            Some(false) => "does NOT advertise user namespaces",
            None => "reports no features (user namespaces not advertised)",
        };
        let how = match (self.listed, self.configured) {
            (true, _) => "listed in CRI Status",
            (false, true) => "in the CRI runtime's effective config",
            (false, false) => "not reported",
        };
        write!(
            f,
            "handler {} {how} by {}; it {userns}",
            self.handler, self.runtime
        )
    }
}

fn configured(config: &serde_json::Value, handler: &str) -> Option<bool> {
    let runtimes = config.get("containerd")?.get("runtimes")?.as_object()?;
    Some(runtimes.contains_key(handler))
}

/// Waits until the runtime on `socket` (this process's path; `shown` is the host path for
/// messages) answers and shows the handler present (`want_present`) or absent.
pub fn wait_for_handler(
    socket: &Path,
    shown: &Path,
    handler: &str,
    want_present: bool,
    timeout: Duration,
) -> Result<HandlerLive, Failure> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last_error = String::from("no answer yet");
    let mut last_seen: Option<HandlerLive> = None;
    let mut listed_names = String::new();
    loop {
        let per_call = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(200), Duration::from_secs(5));
        match CriClient::connect(socket, per_call).and_then(|mut c| {
            let v = c.version()?;
            let (handlers, config) = c.status_verbose()?;
            Ok((v, handlers, config))
        }) {
            Ok((version, handlers, config)) => {
                let entry = handlers.iter().find(|h| h.name == handler);
                let live = HandlerLive {
                    handler: handler.to_owned(),
                    listed: entry.is_some(),
                    configured: config
                        .as_ref()
                        .and_then(|c| configured(c, handler))
                        .unwrap_or(false),
                    user_namespaces: entry.and_then(|h| h.user_namespaces),
                    runtime: format!("{} {}", version.name, version.version),
                    waited: started.elapsed(),
                };
                let reports_any =
                    !handlers.is_empty() || config.as_ref().and_then(|c| configured(c, handler)).is_some();
                let present = live.listed || live.configured;
                if !reports_any {
                    // Neither handler list nor config: nothing to judge by (older CRI-O).
                    return Ok(live);
                }
                if present == want_present {
                    return Ok(live);
                }
                let mut names: Vec<&str> = handlers
                    .iter()
                    .map(|h| h.name.as_str())
                    .filter(|n| !n.is_empty())
                    .collect();
                names.sort_unstable();
                names.dedup();
                listed_names = names.join(", ");
                last_seen = Some(live);
            }
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(match last_seen {
                Some(_) if want_present => Failure::HandlerMissing {
                    socket: shown.to_owned(),
                    handler: handler.to_owned(),
                    listed: if listed_names.is_empty() {
                        "none".into()
                    } else {
                        listed_names
                    },
                },
                Some(_) => Failure::HandlerStillThere {
                    socket: shown.to_owned(),
                    handler: handler.to_owned(),
                },
                None => Failure::CriDown {
                    socket: PathBuf::from(shown),
                    detail: format!("{last_error} (waited {} s)", timeout.as_secs()),
                },
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the runtime on `socket` answers at all (after a rollback's restart).
pub fn wait_for_runtime(socket: &Path, shown: &Path, timeout: Duration) -> Result<String, Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        match CriClient::connect(socket, Duration::from_secs(2)).and_then(|mut c| c.version()) {
            Ok(v) => return Ok(format!("{} {}", v.name, v.version)),
            Err(e) if Instant::now() >= deadline => {
                return Err(Failure::CriDown {
                    socket: shown.to_owned(),
                    detail: e.to_string(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
