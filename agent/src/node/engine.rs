//! The self-test engine as the in-cluster agent runs it: the handlers come from the node's
//! CRI runtime configuration (containerd or CRI-O, found on the host), so the verdict is
//! about the binaries the kubelet's pods will actually get, run on the host (see
//! `usernsguard_runtime::host`); the payload is this binary, and the `cri-pod` check runs
//! it from the agent's own image.

use std::path::PathBuf;

use anyhow::Context as _;
use usernsguard_runtime::bundle::Payload;
use usernsguard_runtime::cri_config::{self, CriConfig};
use usernsguard_runtime::discover::RuntimeHandler;
use usernsguard_runtime::facts::{HostPaths, NodeFacts};
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::report::{Check, HandlerReport, SelfTestReport};
use usernsguard_runtime::selftest::{self, CriSetup, SelfTestConfig};

use super::handlers::{HandlerSet, NodeHandlers};
use super::runner::{RunRequest, SelfTestRunner};
use crate::payload::image_command;

/// [`SelfTestRunner`] backed by `usernsguard_runtime::selftest::run`.
#[derive(Debug, Clone)]
pub struct EngineRunner {
    pub payload: Payload,
    /// Where probe bundles and runtime state live, as a host path (emptied after every run).
    pub work_dir: PathBuf,
    /// Where this process sees the host's `/`.
    pub host: HostRoot,
    /// The CRI socket (host path) when not the one the node's configuration implies.
    pub cri_socket: Option<PathBuf>,
    /// The agent's own image, on the node, for `cri-pod`.
    pub probe_image: Option<String>,
    /// Where each run publishes the handlers it found in the node's CRI configuration (the
    /// failure watches' series follow them).
    pub node_handlers: Option<NodeHandlers>,
}

impl EngineRunner {
    /// The running `usernsguard` binary is the probe payload.
    pub fn new(work_dir: PathBuf, host: HostRoot) -> anyhow::Result<Self> {
        let payload = crate::payload::own_payload()
            .context("cannot locate the usernsguard binary for the probe payload")?;
        Ok(EngineRunner {
            payload,
            work_dir,
            host,
            cri_socket: None,
            probe_image: None,
            node_handlers: None,
        })
    }

    /// The node's CRI configuration, or why there is none.
    fn cri_config(&self) -> Result<CriConfig, String> {
        match cri_config::discover(&self.host) {
            Ok(Some(c)) => Ok(c),
            Ok(None) => Err(format!(
                "no containerd or CRI-O configuration on this node (looked for {}, {} and {} under host root {})",
                cri_config::CONTAINERD_CONFIGS.map(|(c, _)| c).join(", "),
                cri_config::CRIO_CONFIG,
                cri_config::CRIO_DROP_INS,
                self.host.root().display()
            )),
            Err(e) => Err(format!("cannot read the node's CRI runtime configuration: {e}")),
        }
    }
}

/// The handlers to probe out of those `registered`, and the requested names that are not.
fn select(registered: Vec<RuntimeHandler>, requested: &[String]) -> (Vec<RuntimeHandler>, Vec<String>) {
    if requested.is_empty() {
        return (registered, Vec::new());
    }
    let missing = requested
        .iter()
        .filter(|r| !registered.iter().any(|h| &h.name == *r))
        .cloned()
        .collect();
    let selected = registered
        .into_iter()
        .filter(|h| requested.contains(&h.name))
        .collect();
    (selected, missing)
}

impl SelfTestRunner for EngineRunner {
    fn run(&self, req: &RunRequest) -> SelfTestReport {
        let checks: Vec<Check> = if req.checks.is_empty() {
            Check::ALL.to_vec()
        } else {
            req.checks.clone()
        };
        let (config, handlers, missing, problem) = match self.cri_config() {
            Ok(config) => {
                if let Some(node_handlers) = &self.node_handlers {
                    node_handlers.publish(HandlerSet::from_config(&config));
                }
                let (handlers, missing) = select(config.resolve(&self.host), &req.handlers);
                (Some(config), handlers, missing, None)
            }
            Err(problem) => (None, Vec::new(), req.handlers.clone(), Some(problem)),
        };
        let mut selftest = SelfTestConfig::new(handlers, self.payload.clone());
        selftest.checks = checks.clone();
        selftest.timeout = req.timeout;
        selftest.work_dir = self.work_dir.clone();
        selftest.host = self.host.clone();
        let files = config
            .as_ref()
            .map(|c| {
                c.files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        if let Some(config) = config {
            selftest.cri = Some(CriSetup {
                socket: self.cri_socket.clone().unwrap_or_else(|| config.socket()),
                config: Some(config),
                probe_image: self.probe_image.clone(),
                image_command: image_command(),
            });
        }
        let mut report = if selftest.handlers.is_empty() {
            empty_report(&self.host)
        } else {
            match selftest::run(&selftest) {
                Ok(report) => report,
                Err(e) => {
                    let message = e.to_string();
                    tracing::error!(error = %message, "self-test could not run");
                    let mut report = empty_report(&self.host);
                    report.handlers = selftest
                        .handlers
                        .iter()
                        .map(|h| {
                            HandlerReport::unprobed(
                                &h.name,
                                &h.binary.display().to_string(),
                                &checks,
                                &message,
                            )
                        })
                        .collect();
                    report
                }
            }
        };
        for name in &missing {
            let message = match &problem {
                Some(p) => p.clone(),
                None => format!(
                    "runtime handler {name:?} is not registered in the node's CRI runtime configuration ({files})"
                ),
            };
            report
                .handlers
                .push(HandlerReport::unprobed(name, "", &checks, &message));
        }
        if report.handlers.is_empty() {
            report.problem = Some(problem.unwrap_or_else(|| {
                format!("the node's CRI runtime configuration ({files}) registers no runtime handler usernsguard can probe")
            }));
        } else if let Some(p) = problem {
            report.problem = Some(p);
        }
        report
    }
}

/// A report with the node's facts and no handler, for runs that probed nothing.
fn empty_report(host: &HostRoot) -> SelfTestReport {
    SelfTestReport {
        started_at: jiff::Timestamp::now().to_string(),
        duration_seconds: 0.0,
        node: NodeFacts::gather(&HostPaths::of(host)),
        cri: None,
        handlers: Vec::new(),
        problem: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use usernsguard_runtime::{CheckOutcome, Verdict};

    fn runner(host: &std::path::Path, work: &str) -> EngineRunner {
        EngineRunner {
            payload: Payload {
                host_path: "/bin/true".into(),
                args: vec![],
            },
            work_dir: PathBuf::from(work),
            host: HostRoot::at(host).unwrap(),
            cri_socket: None,
            probe_image: None,
            node_handlers: None,
        }
    }

    /// Needs root: the engine refuses to probe otherwise.
    #[test]
    fn probes_the_binaries_the_cri_config_names_and_reports_unregistered_handlers() {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "the self-test engine needs root, as CI has"
        );
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("etc/containerd")).unwrap();
        std::fs::write(
            host.path().join("etc/containerd/config.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.broken.options]\nBinaryName = \"/nonexistent/runc\"\n",
        )
        .unwrap();
        let req = RunRequest {
            handlers: vec!["broken".into(), "kata".into()],
            checks: vec![Check::UsernsCreated],
            timeout: Duration::from_secs(5),
        };
        let report = runner(host.path(), "/run/usernsguard-engine-test").run(&req);
        let broken = report.handler("broken").expect("registered handler probed");
        assert_eq!(broken.binary, "/nonexistent/runc");
        assert_eq!(broken.checks[0].result, CheckOutcome::Error);
        assert!(
            broken.checks[0]
                .message
                .contains("cannot execute /nonexistent/runc"),
            "{}",
            broken.checks[0].message
        );
        let kata = report
            .handler("kata")
            .expect("requested but unregistered handler reported");
        assert_eq!(kata.verdict, Verdict::Unknown);
        assert!(
            kata.checks[0].message.contains("not registered"),
            "{}",
            kata.checks[0].message
        );
    }

    /// Every run publishes the handlers it read (the failure watches' series follow them),
    /// even a run that probes nothing.
    #[test]
    fn a_run_publishes_the_nodes_handlers_and_default() {
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("etc/containerd")).unwrap();
        std::fs::write(
            host.path().join("etc/containerd/config.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"crun\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.crun]\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n",
        )
        .unwrap();
        let handlers = NodeHandlers::new();
        let mut engine = runner(host.path(), "/run/usernsguard-engine-test");
        engine.node_handlers = Some(handlers.clone());
        let req = RunRequest {
            handlers: vec!["kata".into()],
            checks: vec![],
            timeout: Duration::from_secs(5),
        };
        engine.run(&req);
        assert_eq!(handlers.current(), Some(HandlerSet::of(["runc", "crun"], "crun")));
    }

    #[test]
    fn an_unparsable_cri_config_is_reported_on_every_requested_handler() {
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("etc/containerd")).unwrap();
        std::fs::write(host.path().join("etc/containerd/config.toml"), "[plugins\n").unwrap();
        let req = RunRequest {
            handlers: vec!["runc".into()],
            checks: vec![],
            timeout: Duration::from_secs(5),
        };
        let report = runner(host.path(), "/run/usernsguard-engine-test").run(&req);
        let runc = report.handler("runc").unwrap();
        assert_eq!(runc.checks.len(), Check::ALL.len());
        assert!(
            runc.checks[0].message.contains("is not valid TOML"),
            "{}",
            runc.checks[0].message
        );
    }
}
