//! `usernsguard controller --uninstall-all`: the chart's pre-delete hook. Deletes every
//! RuntimeProfile and waits until the agents have taken the runtimes off their nodes, so
//! `helm uninstall` does not leave runtime handlers registered with containerd or CRI-O that
//! nothing manages any more.
//!
//! It releases the uninstall finalizers itself as each profile's last node reports done
//! (the same check as the controller's, see [`super::runtime_profile`]), so it works whether
//! or not a controller replica holds the leader Lease at that moment. It polls: a one-shot
//! job of a few minutes, where a list every few seconds costs less than a set of watches.

use std::time::Duration;

use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;

use super::context::ControllerError;
use super::runtime_profile::release_if_uninstalled;
use crate::crd::{InstallState, NodeReport, RuntimeProfile};

/// What is left when the time is up: per profile, the nodes still holding its install and
/// how far each got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remaining {
    pub profile: String,
    /// `node: state (reason): message`.
    pub nodes: Vec<String>,
}

/// Deletes every RuntimeProfile and waits up to `timeout` for them to be gone. Returns what
/// is left (empty: everything was uninstalled).
pub async fn uninstall_all(
    client: &Client,
    timeout: Duration,
    poll: Duration,
) -> Result<Vec<Remaining>, ControllerError> {
    let deadline = Instant::now() + timeout;
    let profiles: Api<RuntimeProfile> = Api::all(client.clone());
    let reports: Api<NodeReport> = Api::all(client.clone());
    for p in profiles.list(&ListParams::default()).await? {
        if p.metadata.deletion_timestamp.is_none() {
            tracing::info!(profile = %p.name_any(), "deleting RuntimeProfile");
            match profiles.delete(&p.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    loop {
        let left = profiles.list(&ListParams::default()).await?.items;
        if left.is_empty() {
            tracing::info!("every RuntimeProfile is uninstalled and gone");
            return Ok(Vec::new());
        }
        let nrs: Vec<std::sync::Arc<NodeReport>> = reports
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(std::sync::Arc::new)
            .collect();
        let mut remaining = Vec::new();
        for p in &left {
            if release_if_uninstalled(client, p, &nrs).await? {
                continue;
            }
            remaining.push(Remaining {
                profile: p.name_any(),
                nodes: holding(p, &nrs),
            });
        }
        for r in &remaining {
            tracing::info!(profile = %r.profile, nodes = ?r.nodes, "waiting for nodes to uninstall");
        }
        if Instant::now() + poll > deadline {
            return Ok(remaining);
        }
        tokio::time::sleep(poll).await;
    }
}

/// The nodes holding an install of `p`, with the state their agent reports.
fn holding(p: &RuntimeProfile, reports: &[std::sync::Arc<NodeReport>]) -> Vec<String> {
    let name = p.name_any();
    reports
        .iter()
        .filter_map(|nr| {
            let e = nr
                .status
                .as_ref()?
                .installs
                .iter()
                .find(|i| i.runtime_profile == name)?;
            let state = match (e.state, &e.reason) {
                (InstallState::Installed, _) => "waiting for its agent".to_owned(),
                (s, Some(r)) => format!("{} ({r})", s.as_str()),
                (s, None) => s.as_str().to_owned(),
            };
            let mut line = format!("{}: {state}", nr.name_any());
            if !e.message.is_empty() && e.state != InstallState::Installed {
                line.push_str(&format!(": {}", e.message));
            }
            Some(line)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mock_client, ApiServerVerifier};
    use http::{Method, StatusCode};
    use serde_json::{json, Value};

    const PROFILES: &str = "/apis/usernsguard.io/v1alpha1/runtimeprofiles";
    const REPORTS: &str = "/apis/usernsguard.io/v1alpha1/nodereports";

    fn list(kind: &str, items: Vec<Value>) -> Value {
        json!({"apiVersion": "usernsguard.io/v1alpha1", "kind": kind, "metadata": {"resourceVersion": "5"}, "items": items})
    }

    fn profile(name: &str, deleting: bool) -> Value {
        let mut p = RuntimeProfile::test().named(name, name);
        p.metadata.finalizers = Some(vec!["usernsguard.io/uninstall".into()]);
        if deleting {
            p = p.deleting();
        }
        let mut v = serde_json::to_value(p).unwrap();
        v["apiVersion"] = json!("usernsguard.io/v1alpha1");
        v["kind"] = json!("RuntimeProfile");
        v
    }

    fn report(node: &str, profile: &str, state: InstallState, reason: Option<&str>) -> Value {
        let mut nr = NodeReport::test(node, &[]).with_install(profile, 1, state, reason);
        nr.status.as_mut().unwrap().installs[0].message = "restarting containerd failed".into();
        let mut v = serde_json::to_value(nr).unwrap();
        v["apiVersion"] = json!("usernsguard.io/v1alpha1");
        v["kind"] = json!("NodeReport");
        v
    }

    async fn expect_list(server: &mut ApiServerVerifier, path: &str, body: Value) {
        let seen = server.next().await;
        seen.expect(Method::GET, &format!("{path}?"), None);
        seen.reply(StatusCode::OK, &body);
    }

    async fn expect_release(server: &mut ApiServerVerifier, name: &str) {
        let seen = server.next().await;
        seen.expect(
            Method::PATCH,
            &format!("{PROFILES}/{name}?&fieldManager=usernsguard-controller"),
            Some("application/json-patch+json"),
        );
        assert_eq!(
            seen.body[1],
            json!({"op": "remove", "path": "/metadata/finalizers/0"})
        );
        seen.reply(StatusCode::OK, &profile(name, true));
    }

    /// `crun` is deleted by the job (`runc` already was); `runc` has no node left and is
    /// released at once; `crun` waits for n1's agent, then is released; the next list is
    /// empty: done.
    #[tokio::test]
    async fn deletes_every_profile_and_releases_each_once_its_nodes_are_done() {
        let (client, mut server) = mock_client();
        let task = tokio::spawn(async move {
            uninstall_all(&client, Duration::from_secs(600), Duration::from_millis(10))
                .await
                .unwrap()
        });
        expect_list(
            &mut server,
            PROFILES,
            list(
                "RuntimeProfileList",
                vec![profile("crun", false), profile("runc", true)],
            ),
        )
        .await;
        let seen = server.next().await;
        seen.expect(
            Method::DELETE,
            &format!("{PROFILES}/crun?"),
            Some("application/json"),
        );
        seen.reply(StatusCode::OK, &profile("crun", true));

        expect_list(
            &mut server,
            PROFILES,
            list(
                "RuntimeProfileList",
                vec![profile("crun", true), profile("runc", true)],
            ),
        )
        .await;
        expect_list(
            &mut server,
            REPORTS,
            list(
                "NodeReportList",
                vec![report("n1", "crun", InstallState::Installed, None)],
            ),
        )
        .await;
        expect_release(&mut server, "runc").await;

        expect_list(
            &mut server,
            PROFILES,
            list("RuntimeProfileList", vec![profile("crun", true)]),
        )
        .await;
        expect_list(&mut server, REPORTS, list("NodeReportList", vec![])).await;
        expect_release(&mut server, "crun").await;

        expect_list(&mut server, PROFILES, list("RuntimeProfileList", vec![])).await;
        assert_eq!(task.await.unwrap(), vec![]);
    }

    /// n1's uninstall keeps failing: when the time is up, the profile and the node's state
    /// and message are returned (the CLI prints them and exits 1).
    #[tokio::test]
    async fn a_node_that_cannot_uninstall_is_named_when_the_time_is_up() {
        let (client, mut server) = mock_client();
        let task = tokio::spawn(async move {
            // Two polls fit: at 0 and after 300 ms; a third would end after the deadline.
            uninstall_all(&client, Duration::from_millis(500), Duration::from_millis(300))
                .await
                .unwrap()
        });
        expect_list(
            &mut server,
            PROFILES,
            list("RuntimeProfileList", vec![profile("crun", true)]),
        )
        .await;
        for _ in 0..2 {
            expect_list(
                &mut server,
                PROFILES,
                list("RuntimeProfileList", vec![profile("crun", true)]),
            )
            .await;
            expect_list(
                &mut server,
                REPORTS,
                list(
                    "NodeReportList",
                    vec![report("n1", "crun", InstallState::Failed, Some("rolled_back"))],
                ),
            )
            .await;
        }
        assert_eq!(
            task.await.unwrap(),
            vec![Remaining {
                profile: "crun".into(),
                nodes: vec!["n1: failed (rolled_back): restarting containerd failed".into()],
            }]
        );
        server.assert_quiet(Duration::from_millis(50)).await;
    }
}
