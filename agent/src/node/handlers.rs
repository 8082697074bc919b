//! The runtime handlers of this node: those its CRI runtime's configuration registers, and
//! the one it gives pods without a RuntimeClass (containerd `default_runtime_name`, CRI-O
//! `default_runtime`).
//!
//! They bound the pod failure counters' `runtime_handler` label (DESIGN.md: "handlers from
//! the node's config"): the failure watches create zero series for exactly these handlers
//! and remove the series of a handler that goes away, and attribute a pod without a
//! RuntimeClass to the default one. The set is read from the host (`cri_config::discover`),
//! periodically ([`refresh`]) and on every self-test run (the engine publishes what it read),
//! and shared through a [`NodeHandlers`] handle.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use usernsguard_runtime::cri_config::{self, CriConfig};
use usernsguard_runtime::host::HostRoot;

/// The default handler assumed while the node's CRI configuration cannot be read: containerd's
/// built-in `runc`, the most common. No zero series is created for it then.
pub const FALLBACK_DEFAULT_HANDLER: &str = "runc";

/// How often the node's CRI configuration is re-read for its handlers.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(60);

/// The node's runtime handlers as its CRI configuration declares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerSet {
    /// Every handler the configuration registers, the default one included; empty when no
    /// configuration could be read.
    pub handlers: BTreeSet<String>,
    /// The handler of pods without a RuntimeClass.
    pub default: String,
}

impl HandlerSet {
    /// The handlers a CRI configuration registers, and its default handler.
    pub fn from_config(config: &CriConfig) -> HandlerSet {
        let mut handlers: BTreeSet<String> = config.handlers.iter().map(|h| h.name.clone()).collect();
        handlers.insert(config.default_handler.clone());
        HandlerSet {
            handlers,
            default: config.default_handler.clone(),
        }
    }

    /// No configuration found: no handler is known, pods without a RuntimeClass go to
    /// [`FALLBACK_DEFAULT_HANDLER`].
    pub fn unknown() -> HandlerSet {
        HandlerSet {
            handlers: BTreeSet::new(),
            default: FALLBACK_DEFAULT_HANDLER.into(),
        }
    }

    /// A set from names (tests, benchmarks); `default` is added to the handlers.
    pub fn of<const N: usize>(handlers: [&str; N], default: &str) -> HandlerSet {
        let mut set: BTreeSet<String> = handlers.iter().map(|h| h.to_string()).collect();
        set.insert(default.into());
        HandlerSet {
            handlers: set,
            default: default.into(),
        }
    }
}

/// A shared, observable [`HandlerSet`]: `None` until first published. Clones share it.
#[derive(Clone, Debug)]
pub struct NodeHandlers {
    tx: Arc<watch::Sender<Option<HandlerSet>>>,
}

impl Default for NodeHandlers {
    fn default() -> Self {
        NodeHandlers::new()
    }
}

impl NodeHandlers {
    /// Nothing known yet.
    pub fn new() -> NodeHandlers {
        NodeHandlers {
            tx: Arc::new(watch::channel(None).0),
        }
    }

    /// Already known (tests, benchmarks).
    pub fn known(set: HandlerSet) -> NodeHandlers {
        let h = NodeHandlers::new();
        h.publish(set);
        h
    }

    /// Publishes `set`; observers are woken only when it differs from the current one.
    pub fn publish(&self, set: HandlerSet) -> bool {
        self.tx.send_if_modified(|current| {
            if current.as_ref() == Some(&set) {
                return false;
            }
            *current = Some(set);
            true
        })
    }

    /// Whether a set has been published.
    pub fn is_known(&self) -> bool {
        self.tx.borrow().is_some()
    }

    pub fn current(&self) -> Option<HandlerSet> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<HandlerSet>> {
        self.tx.subscribe()
    }
}

/// Reads the node's handlers; blocking (it reads files). `Ok(None)`: no CRI configuration.
pub type HandlerSource = Arc<dyn Fn() -> Result<Option<HandlerSet>, String> + Send + Sync>;

/// The handlers of the CRI configuration found on `host` (`cri_config::discover`).
pub fn discover_on(host: HostRoot) -> HandlerSource {
    Arc::new(move || {
        cri_config::discover(&host)
            .map(|c| c.as_ref().map(HandlerSet::from_config))
            .map_err(|e| e.to_string())
    })
}

/// A source that always finds `set` (tests, benchmarks).
pub fn fixed(set: HandlerSet) -> HandlerSource {
    Arc::new(move || Ok(Some(set.clone())))
}

/// Publishes what `source` reads now and every `period`, forever. The first read always
/// publishes (an unreadable or missing configuration as [`HandlerSet::unknown`]) so the
/// failure watches can start; later failures keep the last set read, since a configuration
/// being rewritten is no reason to drop the node's series.
pub async fn refresh(source: HandlerSource, handlers: NodeHandlers, period: Duration) {
    loop {
        let read = {
            let source = source.clone();
            tokio::task::spawn_blocking(move || source()).await
        };
        match read {
            Ok(Ok(Some(set))) => {
                if handlers.publish(set.clone()) {
                    tracing::info!(handlers = ?set.handlers, default = %set.default, "node runtime handlers");
                }
            }
            Ok(Ok(None)) if !handlers.is_known() => {
                tracing::warn!("no CRI runtime configuration found: pod failures without a RuntimeClass go to {FALLBACK_DEFAULT_HANDLER}, no zero series");
                handlers.publish(HandlerSet::unknown());
            }
            Ok(Err(e)) if !handlers.is_known() => {
                tracing::warn!(error = %e, "cannot read the node's runtime handlers");
                handlers.publish(HandlerSet::unknown());
            }
            Ok(Ok(None)) => tracing::warn!("CRI runtime configuration gone; keeping the last handlers read"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot re-read the node's runtime handlers; keeping the last read")
            }
            Err(e) => tracing::error!(error = %e, "handler discovery panicked"),
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_default_handler_is_one_of_the_nodes_handlers() {
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("etc/crio")).unwrap();
        std::fs::write(
            host.path().join("etc/crio/crio.conf"),
            "[crio.runtime.runtimes.runc]\nruntime_path = \"/usr/bin/runc\"\n",
        )
        .unwrap();
        let source = discover_on(HostRoot::at(host.path()).unwrap());
        let set = source().unwrap().unwrap();
        assert_eq!(
            set,
            HandlerSet::of(["runc"], "crun"),
            "CRI-O's built-in default is crun"
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(discover_on(HostRoot::at(empty.path()).unwrap())(), Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_publishes_at_once_then_only_changes_and_keeps_the_last_on_errors() {
        type Read = Result<Option<HandlerSet>, String>;
        let reads: Arc<Mutex<Vec<Read>>> = Arc::new(Mutex::new(vec![
            Ok(Some(HandlerSet::of(["runc"], "runc"))),
            Err("config being rewritten".into()),
            Ok(Some(HandlerSet::of(["runc", "crun"], "runc"))),
        ]));
        let r = reads.clone();
        let source: HandlerSource = Arc::new(move || {
            let mut r = r.lock().unwrap();
            if r.len() > 1 {
                r.remove(0)
            } else {
                r[0].clone()
            }
        });
        let handlers = NodeHandlers::new();
        let mut rx = handlers.subscribe();
        let task = tokio::spawn(refresh(source, handlers.clone(), Duration::from_secs(60)));
        rx.changed().await.unwrap();
        assert_eq!(handlers.current(), Some(HandlerSet::of(["runc"], "runc")));
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(
            handlers.current(),
            Some(HandlerSet::of(["runc"], "runc")),
            "an error keeps the last"
        );
        rx.changed().await.unwrap();
        assert_eq!(handlers.current(), Some(HandlerSet::of(["crun", "runc"], "runc")));
        task.abort();

        let unknown = NodeHandlers::new();
        let task = tokio::spawn(refresh(
            Arc::new(|| Ok(None)),
            unknown.clone(),
            Duration::from_secs(60),
        ));
        unknown.subscribe().wait_for(Option::is_some).await.unwrap();
        assert_eq!(unknown.current(), Some(HandlerSet::unknown()));
        task.abort();
    }
}
