//! The cluster-wide restart budget of a RuntimeProfile: at most
//! `rollout.maxConcurrentRestarts` nodes restart their CRI runtime for it at once, because
//! a restarting containerd or CRI-O starts no pods for a few seconds and a node whose
//! restart fails is rolled back only after that.
//!
//! The budget is N Leases (`coordination.k8s.io/v1`) in the agent's namespace, named
//! `usernsguard-restart-<profile>-<i>`; a node restarts only while it holds one. Agents
//! coordinate through the API server's optimistic concurrency alone (create fails with 409
//! when another node created the slot first; replace fails with 409 when another node took
//! it since it was read), so no controller has to be up for a rollout to proceed. A slot
//! whose holder died (its `renewTime + leaseDurationSeconds` passed) is taken over; the
//! duration covers a restart, its verification and a rollback restart, so a live holder
//! never loses its slot.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// Longer than the installer's worst case: restart job (300 s) + CRI check (60 s), and the
/// same again for a rollback.
pub const LEASE_DURATION: Duration = Duration::from_secs(900);

/// The N slots of one profile, seen from one node.
#[derive(Clone)]
pub struct RestartBudget {
    api: Api<Lease>,
    /// This node's name: the Leases' `holderIdentity`.
    holder: String,
}

impl std::fmt::Debug for RestartBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartBudget")
            .field("holder", &self.holder)
            .finish()
    }
}

/// A slot this node holds; give it back with [`RestartBudget::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
}

/// The result of asking for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    Slot(Slot),
    /// Every slot is held by a live holder: these nodes.
    Busy {
        holders: Vec<String>,
    },
}

impl RestartBudget {
    pub fn new(client: Client, namespace: &str, holder: &str) -> Self {
        RestartBudget {
            api: Api::namespaced(client, namespace),
            holder: holder.to_owned(),
        }
    }

    /// `usernsguard-restart-<profile>-<i>`, within the 253 characters of an object name
    /// (a profile name may itself have 253: such names are shortened with a hash).
    pub fn slot_name(profile: &str, i: i32) -> String {
        let name = format!("usernsguard-restart-{profile}-{i}");
        if name.len() <= 253 {
            return name;
        }
        let digest = usernsguard_runtime::install::files::sha256_hex(profile.as_bytes());
        format!("usernsguard-restart-{}-{}-{i}", &profile[..200], &digest[..16])
    }

    /// Takes a slot of `max`: one this node already holds first (an agent restarted
    /// mid-restart gets its own slot back instead of holding a second one until the first
    /// expires), else the first unheld, expired or missing one. Reads every slot, then
    /// writes one.
    pub async fn acquire(&self, profile: &str, max: i32, now: Timestamp) -> Result<Acquired, kube::Error> {
        let mut slots = Vec::new();
        for i in 0..max.max(1) {
            let name = Self::slot_name(profile, i);
            let lease = self.api.get_opt(&name).await?;
            slots.push((name, lease));
        }
        // Stable: the index order stays among the rest.
        slots.sort_by_key(|(_, lease)| holder(lease.as_ref()) != Some(self.holder.as_str()));
        let mut holders = Vec::new();
        for (name, lease) in slots {
            let Some(mut lease) = lease else {
                match self
                    .api
                    .create(&PostParams::default(), &self.new_lease(&name, now))
                    .await
                {
                    Ok(_) => return Ok(Acquired::Slot(Slot { name })),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(e),
                }
            };
            let held_by = holder(Some(&lease)).map(str::to_owned);
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            let free = match &held_by {
                None => true,
                Some(h) if *h == self.holder => true,
                Some(_) => expired(spec, now),
            };
            if !free {
                holders.extend(held_by);
                continue;
            }
            if held_by.as_deref() != Some(self.holder.as_str()) {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.acquire_time = Some(MicroTime(now));
            }
            spec.holder_identity = Some(self.holder.clone());
            spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
            spec.renew_time = Some(MicroTime(now));
            // The resourceVersion read above makes this a compare-and-swap.
            match self.api.replace(&name, &PostParams::default(), &lease).await {
                Ok(_) => return Ok(Acquired::Slot(Slot { name })),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Acquired::Busy { holders })
    }

    /// Gives the slot back (clears the holder; the Lease stays for the next node). A slot
    /// another node took meanwhile (only possible after it expired) is left alone.
    pub async fn release(&self, slot: &Slot) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&slot.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self.api.replace(&slot.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn new_lease(&self, name: &str, now: Timestamp) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "usernsguard".to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.holder.clone()),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        }
    }
}

/// Who holds the slot, if anyone.
fn holder(lease: Option<&Lease>) -> Option<&str> {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// A holder that has not renewed within its duration is gone. A Lease without a renew
/// time or duration was not written by an agent that meant to keep it.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    renewed.0 + SignedDuration::from_secs(i64::from(secs)) < now
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mock_client, ApiServerVerifier};
    use http::{Method, StatusCode};
    use serde_json::{json, Value};

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/usernsguard/leases";

    fn budget() -> (RestartBudget, ApiServerVerifier) {
        let (client, server) = mock_client();
        (RestartBudget::new(client, "usernsguard", "n1"), server)
    }

    fn now() -> Timestamp {
        "2026-11-30T12:00:00Z".parse().unwrap()
    }

    fn lease(name: &str, holder: Option<&str>, renewed: &str, rv: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "usernsguard", "resourceVersion": rv},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 900,
                     "renewTime": renewed, "acquireTime": renewed, "leaseTransitions": 3},
        })
    }

    #[tokio::test]
    async fn a_missing_slot_is_created_held_by_this_node() {
        let (b, mut server) = budget();
        let task = tokio::spawn(async move { b.acquire("crun", 2, now()).await.unwrap() });
        let seen = server.next().await;
        seen.expect(Method::GET, &format!("{LEASES}/usernsguard-restart-crun-0"), None);
        seen.fail(StatusCode::NOT_FOUND, "NotFound");
        let seen = server.next().await;
        seen.expect(Method::GET, &format!("{LEASES}/usernsguard-restart-crun-1"), None);
        seen.fail(StatusCode::NOT_FOUND, "NotFound");
        let seen = server.next().await;
        seen.expect(Method::POST, &format!("{LEASES}?"), Some("application/json"));
        assert_eq!(seen.body["metadata"]["name"], "usernsguard-restart-crun-0");
        assert_eq!(seen.body["spec"]["holderIdentity"], "n1");
        assert_eq!(seen.body["spec"]["leaseDurationSeconds"], 900);
        assert_eq!(seen.body["spec"]["renewTime"], "2026-11-30T12:00:00.000000Z");
        seen.echo();
        assert_eq!(
            task.await.unwrap(),
            Acquired::Slot(Slot {
                name: "usernsguard-restart-crun-0".into()
            })
        );
    }

    /// Slot 0 is held by a live node; slot 1 was created by another node between this node's
    /// GET and its create (409): the budget of 2 is used up.
    #[tokio::test]
    async fn held_slots_and_a_lost_create_race_leave_the_node_waiting() {
        let (b, mut server) = budget();
        let task = tokio::spawn(async move { b.acquire("crun", 2, now()).await.unwrap() });
        let seen = server.next().await;
        seen.expect(Method::GET, &format!("{LEASES}/usernsguard-restart-crun-0"), None);
        let held = lease(
            "usernsguard-restart-crun-0",
            Some("n7"),
            "2026-11-30T11:55:00Z",
            "10",
        );
        seen.reply(StatusCode::OK, &held);
        let seen = server.next().await;
        seen.expect(Method::GET, &format!("{LEASES}/usernsguard-restart-crun-1"), None);
        seen.fail(StatusCode::NOT_FOUND, "NotFound");
        let seen = server.next().await;
        seen.expect(Method::POST, &format!("{LEASES}?"), Some("application/json"));
        seen.fail(StatusCode::CONFLICT, "AlreadyExists");
        assert_eq!(
            task.await.unwrap(),
            Acquired::Busy {
                holders: vec!["n7".into()]
            }
        );
    }

    /// A holder that stopped renewing 15 minutes ago is gone: its slot is replaced with the
    /// resourceVersion read (compare-and-swap), counting a transition.
    #[tokio::test]
    async fn an_expired_slot_is_taken_over_with_compare_and_swap() {
        let (b, mut server) = budget();
        let task = tokio::spawn(async move { b.acquire("crun", 1, now()).await.unwrap() });
        let seen = server.next().await;
        let stale = lease(
            "usernsguard-restart-crun-0",
            Some("n7"),
            "2026-11-30T11:44:59Z",
            "10",
        );
        seen.reply(StatusCode::OK, &stale);
        let seen = server.next().await;
        seen.expect(
            Method::PUT,
            &format!("{LEASES}/usernsguard-restart-crun-0?"),
            Some("application/json"),
        );
        assert_eq!(seen.body["metadata"]["resourceVersion"], "10");
        assert_eq!(seen.body["spec"]["holderIdentity"], "n1");
        assert_eq!(seen.body["spec"]["leaseTransitions"], 4);
        assert_eq!(seen.body["spec"]["acquireTime"], "2026-11-30T12:00:00.000000Z");
        seen.echo();
        assert!(matches!(task.await.unwrap(), Acquired::Slot(_)));
    }

    /// Just inside its duration the holder still owns it.
    #[tokio::test]
    async fn a_slot_renewed_within_its_duration_is_not_taken() {
        let (b, mut server) = budget();
        let task = tokio::spawn(async move { b.acquire("crun", 1, now()).await.unwrap() });
        let seen = server.next().await;
        let live = lease(
            "usernsguard-restart-crun-0",
            Some("n7"),
            "2026-11-30T11:45:01Z",
            "10",
        );
        seen.reply(StatusCode::OK, &live);
        assert_eq!(
            task.await.unwrap(),
            Acquired::Busy {
                holders: vec!["n7".into()]
            }
        );
    }

    /// Two nodes read the same free slot; the other one's replace landed first: the next
    /// slot (missing) is created.
    #[tokio::test]
    async fn losing_the_replace_race_moves_on_to_the_next_slot() {
        let (b, mut server) = budget();
        let task = tokio::spawn(async move { b.acquire("crun", 2, now()).await.unwrap() });
        let seen = server.next().await;
        seen.reply(
            StatusCode::OK,
            &lease("usernsguard-restart-crun-0", None, "2026-11-30T11:00:00Z", "10"),
        );
        let seen = server.next().await;
        seen.expect(Method::GET, &format!("{LEASES}/usernsguard-restart-crun-1"), None);
        seen.fail(StatusCode::NOT_FOUND, "NotFound");
        let seen = server.next().await;
        seen.expect(
            Method::PUT,
            &format!("{LEASES}/usernsguard-restart-crun-0?"),
            Some("application/json"),
        );
        seen.fail(StatusCode::CONFLICT, "Conflict");
        let seen = server.next().await;
        seen.expect(Method::POST, &format!("{LEASES}?"), Some("application/json"));
        assert_eq!(seen.body["metadata"]["name"], "usernsguard-restart-crun-1");
        seen.echo();
        assert_eq!(
            task.await.unwrap(),
            Acquired::Slot(Slot {
                name: "usernsguard-restart-crun-1".into()
            })
        );
    }

    /// Slot 0 is free, but slot 1 is still held by this very node (its agent restarted
    /// mid-restart): it takes slot 1 back, with no new transition, and leaves slot 0 to
    /// the others.
    #[tokio::test]
    async fn a_slot_this_node_holds_is_taken_back_before_a_free_one() {
        let (b, mut server) = budget();
        let task = tokio::spawn(async move { b.acquire("crun", 2, now()).await.unwrap() });
        let seen = server.next().await;
        seen.reply(
            StatusCode::OK,
            &lease("usernsguard-restart-crun-0", None, "2026-11-30T11:00:00Z", "10"),
        );
        let seen = server.next().await;
        seen.reply(
            StatusCode::OK,
            &lease(
                "usernsguard-restart-crun-1",
                Some("n1"),
                "2026-11-30T11:59:00Z",
                "12",
            ),
        );
        let seen = server.next().await;
        seen.expect(
            Method::PUT,
            &format!("{LEASES}/usernsguard-restart-crun-1?"),
            Some("application/json"),
        );
        assert_eq!(seen.body["metadata"]["resourceVersion"], "12");
        assert_eq!(seen.body["spec"]["leaseTransitions"], 3, "no new transition");
        seen.echo();
        assert_eq!(
            task.await.unwrap(),
            Acquired::Slot(Slot {
                name: "usernsguard-restart-crun-1".into()
            })
        );
        server.assert_quiet(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn release_clears_only_this_nodes_hold() {
        let (b, mut server) = budget();
        let slot = Slot {
            name: "usernsguard-restart-crun-0".into(),
        };
        let b2 = b.clone();
        let s2 = slot.clone();
        let task = tokio::spawn(async move { b2.release(&s2).await.unwrap() });
        let seen = server.next().await;
        seen.reply(
            StatusCode::OK,
            &lease(
                "usernsguard-restart-crun-0",
                Some("n1"),
                "2026-11-30T12:00:00Z",
                "11",
            ),
        );
        let seen = server.next().await;
        seen.expect(
            Method::PUT,
            &format!("{LEASES}/usernsguard-restart-crun-0?"),
            Some("application/json"),
        );
        assert_eq!(seen.body["spec"].get("holderIdentity"), None, "{}", seen.body);
        assert_eq!(seen.body["metadata"]["resourceVersion"], "11");
        seen.echo();
        task.await.unwrap();

        // Taken over by n7 after it expired: not ours to release.
        let task = tokio::spawn(async move { b.release(&slot).await.unwrap() });
        let seen = server.next().await;
        seen.reply(
            StatusCode::OK,
            &lease(
                "usernsguard-restart-crun-0",
                Some("n7"),
                "2026-11-30T12:20:00Z",
                "14",
            ),
        );
        task.await.unwrap();
        server.assert_quiet(Duration::from_millis(50)).await;
    }

    #[test]
    fn slot_names_stay_valid_object_names() {
        assert_eq!(RestartBudget::slot_name("crun", 0), "usernsguard-restart-crun-0");
        let long = "p".repeat(253);
        let a = RestartBudget::slot_name(&long, 12);
        assert!(a.len() <= 253, "{}", a.len());
        assert!(a.ends_with("-12"));
        let other = format!("{}q", "p".repeat(252));
        assert_ne!(
            RestartBudget::slot_name(&other, 12),
            a,
            "names differing only past the cut stay distinct"
        );
    }
}
