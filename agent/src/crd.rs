//! The `usernsguard.io/v1alpha1` API: `RuntimeProfile`, `SelfTest` and `NodeReport`, one file
//! per kind, and [`names`], the one place the DESIGN.md names used in code are spelled.
//!
//! Types only. The `///` docs become the CRD descriptions that `kubectl explain` shows, and
//! the `schemars`/`x_kube` attributes become the OpenAPI and CEL validation the apiserver
//! enforces, so a bad spec is refused at `kubectl apply` instead of surfacing later as a
//! reconcile error on some node. `crds/*.yaml` is generated from here (`usernsguard crds`).
//!
//! Self-test results are not re-declared: `NodeReport.status` embeds the report types of
//! `usernsguard-runtime`, so `usernsguard selftest --output json` and the NodeReport show the
//! same shapes.

// `printcolumn(type_ = "integer", ...)` repeated for several columns is what kube's derive
// expects; clippy reads the repeated `key = value` pairs as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod names;
mod node_report;
mod runtime_profile;
mod self_test;

pub use names::InstallState;
pub use node_report::*;
pub use runtime_profile::*;
pub use self_test::*;

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use kube::CustomResourceExt;

    use super::*;

    fn example<K: serde::de::DeserializeOwned>(name: &str) -> K {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name);
        let text = fs::read_to_string(&path).unwrap();
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn empty_selftest_spec_gets_the_schema_defaults_in_rust_too() {
        let st: SelfTest = example("selftest-default.yaml");
        assert_eq!(st.spec, SelfTestSpec::default());
        let schema = serde_json::to_value(SelfTest::crd()).unwrap();
        let spec =
            &schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(
            spec["probeTimeoutSeconds"]["default"],
            st.spec.probe_timeout_seconds
        );
        assert_eq!(spec["publishNodeLabels"]["default"], st.spec.publish_node_labels);
    }

    #[test]
    fn valid_examples_deserialize_into_the_types() {
        use usernsguard_runtime::{Check, CheckOutcome, Reason, Verdict};

        let st: SelfTest = example("selftest-periodic.yaml");
        assert_eq!(st.spec.runtime_handlers, ["runc", "crun"]);
        assert_eq!(
            st.spec.checks,
            [Check::UsernsCreated, Check::UsernsJoined, Check::Features]
        );
        assert_eq!(st.spec.interval.as_deref(), Some("6h"));
        assert!(!st.spec.publish_node_labels);

        let rtp: RuntimeProfile = example("runtimeprofile-crun.yaml");
        assert_eq!(rtp.spec.runtime, OciRuntime::Crun);
        assert_eq!(rtp.spec.binary.source, BinarySourceKind::Bundled);
        assert_eq!(rtp.spec.cri.runtime, CriRuntime::Containerd);
        assert_eq!(rtp.spec.cri.restart, RestartPolicy::Systemd);
        assert_eq!(rtp.spec.rollout.max_concurrent_restarts, 1);
        assert!(rtp.spec.runtime_class.create && rtp.spec.runtime_class.require_self_test_pass);
        assert_eq!(rtp.spec.runtime_class.overhead["memory"], "20Mi");

        let rtp: RuntimeProfile = example("runtimeprofile-runc-crio.yaml");
        assert_eq!(rtp.spec.binary.source, BinarySourceKind::Url);
        assert_eq!(rtp.spec.cri.runtime, CriRuntime::Crio);
        assert_eq!(rtp.spec.rollout.max_concurrent_restarts, 2);

        let rtp: RuntimeProfile = example("runtimeprofile-host-k3s.yaml");
        assert_eq!(rtp.spec.cri.unit.as_deref(), Some("k3s-agent.service"));
        assert!(!rtp.spec.runtime_class.create);

        let nr: NodeReport = example("nodereport.yaml");
        let status = nr.status.unwrap();
        let runc = &status.results[0];
        assert_eq!((runc.self_test.as_str(), runc.generation), ("default", 1));
        assert_eq!(runc.report.handler, "runc");
        assert_eq!(runc.report.verdict, Verdict::Fail);
        let joined = runc.report.check(Check::UsernsJoined).unwrap();
        assert_eq!(joined.result, CheckOutcome::Fail);
        assert_eq!(joined.reason, Some(Reason::MqueueOwnerUnmapped));
        assert_eq!(status.results[1].report.verdict, Verdict::Pass);
        assert_eq!(status.installs[0].state, InstallState::Installed);
        assert_eq!(status.node.unwrap().kernel, "6.1.0-28-amd64");
    }

    #[test]
    fn node_report_result_flattens_the_handler_report() {
        use usernsguard_runtime::report::{ClaimedFeatures, HandlerReport};
        use usernsguard_runtime::{Check, CheckResult, Verdict};

        let result = SelfTestResult {
            self_test: "default".into(),
            generation: 3,
            started_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-29T03:00:00Z".parse().unwrap(),
            ),
            report: HandlerReport {
                handler: "crun".into(),
                binary: "/usr/bin/crun".into(),
                runtime: "crun".into(),
                version: "1.8.1".into(),
                features: ClaimedFeatures::default(),
                verdict: Verdict::Pass,
                checks: vec![CheckResult::pass(Check::UsernsCreated, "ok")],
            },
        };
        let v = serde_json::to_value(&result).unwrap();
        assert_eq!(v["selfTest"], "default");
        assert_eq!(v["handler"], "crun");
        assert_eq!(v["verdict"], "pass");
        assert_eq!(v["checks"][0]["check"], "userns-created");
        assert_eq!(v["startedAt"], "2026-11-29T03:00:00Z");
        assert!(v.get("report").is_none(), "{v}");
        assert_eq!(serde_json::from_value::<SelfTestResult>(v).unwrap(), result);
    }
}
