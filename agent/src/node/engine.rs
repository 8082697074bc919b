//! The self-test engine as the in-cluster agent runs it: the handlers come from the node's
//! CRI runtime configuration (containerd or CRI-O), so the verdict is about the binaries the
//! kubelet's pods will actually get, and the payload is this binary.

use std::path::PathBuf;

use anyhow::Context as _;
use usernsguard_runtime::bundle::Payload;
use usernsguard_runtime::cri_config;
use usernsguard_runtime::discover::{find_on_path, RuntimeHandler};
use usernsguard_runtime::facts::{HostPaths, NodeFacts};
use usernsguard_runtime::report::{Check, HandlerReport, SelfTestReport};
use usernsguard_runtime::selftest::{self, SelfTestConfig};

use super::runner::{RunRequest, SelfTestRunner};

/// [`SelfTestRunner`] backed by `usernsguard_runtime::selftest::run`.
#[derive(Debug, Clone)]
pub struct EngineRunner {
    pub payload: Payload,
    /// Where probe bundles and runtime state live (emptied after every run).
    pub work_dir: PathBuf,
    /// The host's `/etc`, where `containerd/config.toml` or `crio/` is read from.
    pub etc: PathBuf,
}

impl EngineRunner {
    /// The running `usernsguard` binary is the probe payload.
    pub fn new(work_dir: PathBuf, etc: PathBuf) -> anyhow::Result<Self> {
        let payload = crate::payload::own_payload()
            .context("cannot locate the usernsguard binary for the probe payload")?;
        Ok(EngineRunner {
            payload,
            work_dir,
            etc,
        })
    }

    /// The handlers to probe and, separately, requested names the node does not register.
    fn handlers(&self, requested: &[String]) -> Result<(Vec<RuntimeHandler>, Vec<String>), String> {
        let path = std::env::var_os("PATH");
        let registered = cri_config::node_handlers(&self.etc, |name| find_on_path(name, path.as_deref()))
            .map_err(|e| e.to_string())?;
        if requested.is_empty() {
            return Ok((registered, Vec::new()));
        }
        let selected = registered
            .iter()
            .filter(|h| requested.contains(&h.name))
            .cloned()
            .collect();
        let missing = requested
            .iter()
            .filter(|r| !registered.iter().any(|h| &h.name == *r))
            .cloned()
            .collect();
        Ok((selected, missing))
    }
}

impl SelfTestRunner for EngineRunner {
    fn run(&self, req: &RunRequest) -> SelfTestReport {
        let checks: Vec<Check> = if req.checks.is_empty() {
            Check::ALL.to_vec()
        } else {
            req.checks.clone()
        };
        let (handlers, missing, config_error) = match self.handlers(&req.handlers) {
            Ok((h, m)) => (h, m, None),
            Err(e) => (Vec::new(), req.handlers.clone(), Some(e)),
        };
        let mut config = SelfTestConfig::new(handlers, self.payload.clone());
        config.checks = checks.clone();
        config.timeout = req.timeout;
        config.work_dir = self.work_dir.clone();
        let mut report = match selftest::run(&config) {
            Ok(report) => report,
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "self-test could not run");
                let unprobed = config
                    .handlers
                    .iter()
                    .map(|h| {
                        HandlerReport::unprobed(&h.name, &h.binary.display().to_string(), &checks, &message)
                    })
                    .collect();
                SelfTestReport {
                    started_at: jiff::Timestamp::now().to_string(),
                    duration_seconds: 0.0,
                    node: NodeFacts::gather(&HostPaths::default()),
                    handlers: unprobed,
                }
            }
        };
        for name in missing {
            let message = match &config_error {
                Some(e) => format!("cannot read the node's CRI runtime configuration: {e}"),
                None => format!(
                    "runtime handler {name:?} is not registered in the node's containerd or CRI-O configuration under {}",
                    self.etc.display()
                ),
            };
            report
                .handlers
                .push(HandlerReport::unprobed(&name, "", &checks, &message));
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use usernsguard_runtime::{CheckOutcome, Verdict};

    fn runner(etc: &std::path::Path, work: &str) -> EngineRunner {
        EngineRunner {
            payload: Payload {
                host_path: "/bin/true".into(),
                args: vec![],
            },
            work_dir: PathBuf::from(work),
            etc: etc.to_owned(),
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
        let etc = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(etc.path().join("containerd")).unwrap();
        std::fs::write(
            etc.path().join("containerd/config.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.broken.options]\nBinaryName = \"/nonexistent/runc\"\n",
        )
        .unwrap();
        let req = RunRequest {
            handlers: vec!["broken".into(), "kata".into()],
            checks: vec![Check::UsernsCreated],
            timeout: Duration::from_secs(5),
        };
        let report = runner(etc.path(), "/run/usernsguard-engine-test").run(&req);
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

    #[test]
    fn an_unparsable_cri_config_is_reported_on_every_requested_handler() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(etc.path().join("containerd")).unwrap();
        std::fs::write(etc.path().join("containerd/config.toml"), "[plugins\n").unwrap();
        let req = RunRequest {
            handlers: vec!["runc".into()],
            checks: vec![],
            timeout: Duration::from_secs(5),
        };
        let report = runner(etc.path(), "/run/usernsguard-engine-test").run(&req);
        let runc = report.handler("runc").unwrap();
        assert_eq!(runc.checks.len(), 4);
        assert!(
            runc.checks[0].message.contains("is not valid TOML"),
            "{}",
            runc.checks[0].message
        );
    }
}
