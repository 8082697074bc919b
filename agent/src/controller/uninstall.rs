//! `usernsguard controller --uninstall-all`: the chart's pre-delete hook. Deletes every
//! RuntimeProfile and waits until the agents have taken the runtimes off their nodes, so
//! `helm uninstall` does not leave runtime handlers registered with containerd or CRI-O that
//! nothing manages any more.
//!
//! It releases the uninstall finalizers itself as each profile's last node reports done
//! (the same check as the controller's, see [`super::runtime_profile`]), so it works whether
//! or not a controller replica holds the leader Lease at that moment. It polls: a one-shot
//! job of a few minutes, where a list every few seconds costs less than a set of watches.

use std::collections::BTreeSet;
use std::sync::Arc;
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

/// Deletes every RuntimeProfile and waits up to `timeout` until no profile is left and no
/// NodeReport holds an install (a profile deleted without our finalizer, because no
/// controller had added it yet, is gone at once while its nodes still uninstall). Returns
/// what is left (empty: everything was uninstalled). A failed request is logged and tried
/// again at the next poll: a conflict with the controller releasing the same finalizer, or
/// an API server restart, must not fail `helm uninstall`.
pub async fn uninstall_all(
    client: &Client,
    timeout: Duration,
    poll: Duration,
) -> Result<Vec<Remaining>, ControllerError> {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    loop {
        match poll_once(client).await {
            Ok(remaining) if remaining.is_empty() => {
                tracing::info!("every RuntimeProfile is uninstalled and gone");
                return Ok(Vec::new());
            }
            Ok(remaining) => {
                for r in &remaining {
                    tracing::info!(profile = %r.profile, nodes = ?r.nodes, "waiting for nodes to uninstall");
                }
                last = remaining;
            }
            Err(e) => tracing::warn!(error = %e, "uninstall-all: request failed; trying again"),
        }
        if Instant::now() + poll > deadline {
            return Ok(last);
        }
        tokio::time::sleep(poll).await;
    }
}

/// One round: delete the profiles not yet deleting, release those no node holds, and say
/// which nodes still hold an install of which profile (deleted ones included).
async fn poll_once(client: &Client) -> Result<Vec<Remaining>, ControllerError> {
    let profiles: Api<RuntimeProfile> = Api::all(client.clone());
    let reports: Api<NodeReport> = Api::all(client.clone());
    let left = profiles.list(&ListParams::default()).await?.items;
    for p in &left {
        if p.metadata.deletion_timestamp.is_none() {
            tracing::info!(profile = %p.name_any(), "deleting RuntimeProfile");
            match profiles.delete(&p.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let nrs: Vec<Arc<NodeReport>> = reports
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let mut held: BTreeSet<String> = nrs
        .iter()
        .filter_map(|nr| nr.status.as_ref())
        .flat_map(|s| s.installs.iter().map(|i| i.runtime_profile.clone()))
        .collect();
    for p in &left {
        // The listed object predates our delete: released once no node holds it either way.
        if release_if_uninstalled(client, p, &nrs).await? {
            held.remove(&p.name_any());
        }
    }
    Ok(held
        .into_iter()
        .map(|profile| Remaining {
            nodes: holding(&profile, &nrs),
            profile,
        })
        .collect())
}

/// The nodes holding an install of `profile`, with the state their agent reports.
fn holding(profile: &str, reports: &[Arc<NodeReport>]) -> Vec<String> {
    reports
        .iter()
        .filter_map(|nr| {
            let e = nr.install_of(profile)?;
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
    /// released at once; `crun` waits for n1's agent, then is released: done.
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
        assert_eq!(task.await.unwrap(), vec![]);
        server.assert_quiet(Duration::from_millis(50)).await;
    }

    /// `crun` was deleted before any controller added the finalizer: the profile is gone at
    /// once, but n1 still holds its install, so the job waits for it; a failed list (the
    /// API server restarting) is tried again, not fatal.
    #[tokio::test]
    async fn waits_for_installs_of_profiles_already_gone_and_survives_a_failed_list() {
        let (client, mut server) = mock_client();
        let task = tokio::spawn(async move {
            uninstall_all(&client, Duration::from_secs(600), Duration::from_millis(10))
                .await
                .unwrap()
        });
        expect_list(&mut server, PROFILES, list("RuntimeProfileList", vec![])).await;
        expect_list(
            &mut server,
            REPORTS,
            list(
                "NodeReportList",
                vec![report("n1", "crun", InstallState::Installed, None)],
            ),
        )
        .await;
        let seen = server.next().await;
        seen.expect(Method::GET, &format!("{PROFILES}?"), None);
        seen.fail(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
        expect_list(&mut server, PROFILES, list("RuntimeProfileList", vec![])).await;
        let mut done = serde_json::to_value(NodeReport::test("n1", &[])).unwrap();
        done["apiVersion"] = json!("usernsguard.io/v1alpha1");
        done["kind"] = json!("NodeReport");
        expect_list(&mut server, REPORTS, list("NodeReportList", vec![done])).await;
        assert_eq!(task.await.unwrap(), vec![]);
        server.assert_quiet(Duration::from_millis(50)).await;
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
