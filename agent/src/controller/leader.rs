//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several `usernsguard
//! controller` replicas exactly one writes SelfTest status and RuntimeClasses.
//!
//! kube 5 ships no elector, so this is the client-go algorithm, small enough to test:
//! - a standby judges expiry by its *own* monotonic clock, from the moment it last saw the
//!   Lease record change (never by comparing `renewTime` with its wall clock, which would
//!   make clock skew between nodes decide who leads);
//! - every write is a create, or a replace carrying the `resourceVersion` that was read, so
//!   two candidates racing for an expired Lease cannot both win (the loser gets 409);
//! - a leader that cannot renew within `renew_deadline` (shorter than the lease duration)
//!   stops acting before any standby may consider the Lease expired.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;

/// Timing of the election, as in client-go (15 s / 10 s / 2 s by default).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The fields of a Lease that decide leadership; a change of any of them means the holder
/// is alive (or changed).
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: String,
    renew_time: Option<Timestamp>,
    transitions: i32,
    duration_seconds: i32,
}

impl Record {
    fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.unwrap_or_default(),
            renew_time: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
            duration_seconds: spec.lease_duration_seconds.unwrap_or(0),
        }
    }
}

/// One candidate's view of one Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    /// Wall clock for the timestamps written into the Lease (injectable for exact test bodies).
    wall: fn() -> Timestamp,
    observed: Option<(Record, Instant)>,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish()
    }
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        LeaseLock {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            wall: Timestamp::now,
            observed: None,
        }
    }

    #[cfg(test)]
    pub fn with_wall_clock(mut self, wall: fn() -> Timestamp) -> Self {
        self.wall = wall;
        self
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One election round: returns Ok(true) if this candidate holds the Lease afterwards.
    /// A lost race (409) is Ok(false); other API errors are returned so the caller can
    /// apply its renew deadline.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = (self.wall)();
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return self.write(self.api.create(&PostParams::default(), &lease).await);
        };
        let record = Record::of(&current);
        let changed = self.observed.as_ref().map(|(r, _)| r != &record).unwrap_or(true);
        if changed {
            self.observed = Some((record.clone(), Instant::now()));
        }
        let observed_at = self
            .observed
            .as_ref()
            .map(|(_, at)| *at)
            .unwrap_or_else(Instant::now);
        let duration = Duration::from_secs(record.duration_seconds.max(1) as u64);
        let held_by_me = record.holder == self.identity;
        if !held_by_me && !record.holder.is_empty() && Instant::now() < observed_at + duration {
            return Ok(false);
        }
        let spec = current.spec.clone().unwrap_or_default();
        let (acquired, transitions) = if held_by_me {
            (spec.acquire_time.map(|t| t.0).unwrap_or(now), record.transitions)
        } else {
            (now, record.transitions + 1)
        };
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: current.metadata.resource_version.clone(),
                ..ObjectMeta::default()
            },
            spec: Some(self.spec(acquired, now, transitions)),
        };
        self.write(self.api.replace(&self.name, &PostParams::default(), &lease).await)
    }

    fn spec(&self, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn write(&mut self, res: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
        match res {
            Ok(lease) => {
                self.observed = Some((Record::of(&lease), Instant::now()));
                Ok(true)
            }
            // Someone else wrote first (create race or stale resourceVersion): not leader.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Runs `work` only while `lock` is held: waits as a standby, starts `work` on acquiring,
/// renews every `retry_period`, and aborts `work` as soon as the Lease is lost or could not
/// be renewed within `renew_deadline`; then goes back to standby. `leading` mirrors the
/// state; `ready` latches true after the first round that reached the API server (leader
/// or standby alike: both are healthy replicas). Never returns.
pub async fn run_elected<F, Fut>(
    mut lock: LeaseLock,
    leading: watch::Sender<bool>,
    ready: watch::Sender<bool>,
    work: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let timing = lock.timing;
    loop {
        loop {
            match lock.try_acquire_or_renew().await {
                Ok(true) => {
                    ready.send_replace(true);
                    break;
                }
                Ok(false) => {
                    ready.send_replace(true);
                }
                Err(e) => tracing::warn!(error = %e, "leader election: cannot read the Lease"),
            }
            tokio::time::sleep(timing.retry_period).await;
        }
        tracing::info!(identity = lock.identity(), "leader election: acquired the Lease");
        let _ = leading.send(true);
        let task = tokio::spawn(work());
        let mut last_renew = Instant::now();
        loop {
            tokio::time::sleep(timing.retry_period).await;
            match lock.try_acquire_or_renew().await {
                Ok(true) => last_renew = Instant::now(),
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: renew failed");
                    if last_renew.elapsed() >= timing.renew_deadline {
                        break;
                    }
                }
            }
        }
        task.abort();
        let _ = task.await;
        let _ = leading.send(false);
        tracing::warn!(
            identity = lock.identity(),
            "leader election: lost the Lease, standing by"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mock_client, ApiServerVerifier};
    use http::{Method, StatusCode};
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/usernsguard-controller";

    fn wall() -> Timestamp {
        "2026-11-29T04:00:00Z".parse().unwrap()
    }

    fn lease(holder: &str, rv: &str, renew: &str, transitions: i32) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "usernsguard-controller", "namespace": "ns", "resourceVersion": rv},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "acquireTime": "2026-11-29T03:00:00.000000Z", "renewTime": renew,
                     "leaseTransitions": transitions}
        })
    }

    fn lock(identity: &str) -> (LeaseLock, ApiServerVerifier) {
        let (client, server) = mock_client();
        let api = Api::namespaced(client, "ns");
        let lock = LeaseLock::new(api, "usernsguard-controller", identity, LeaseTiming::default())
            .with_wall_clock(wall);
        (lock, server)
    }

    /// Serves one GET of the Lease with `body`.
    async fn serve_get(server: &mut ApiServerVerifier, body: &Value) {
        let seen = server.next().await;
        seen.expect(Method::GET, PATH, None);
        seen.reply(StatusCode::OK, body);
    }

    #[tokio::test(start_paused = true)]
    async fn creates_missing_lease_and_leads() {
        let (mut lock, mut server) = lock("b");
        let scenario = tokio::spawn(async move {
            let seen = server.next().await;
            seen.expect(Method::GET, PATH, None);
            seen.fail(StatusCode::NOT_FOUND, "NotFound");
            let seen = server.next().await;
            seen.expect(
                Method::POST,
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases?",
                Some("application/json"),
            );
            assert_eq!(seen.body["spec"]["holderIdentity"], "b");
            assert_eq!(seen.body["spec"]["leaseDurationSeconds"], 15);
            assert_eq!(seen.body["spec"]["leaseTransitions"], 0);
            assert_eq!(seen.body["spec"]["renewTime"], "2026-11-29T04:00:00.000000Z");
            seen.echo();
        });
        assert!(lock.try_acquire_or_renew().await.unwrap());
        crate::testing::finish(scenario, Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn standby_waits_for_expiry_then_takes_over_with_resource_version() {
        let (mut lock, mut server) = lock("b");
        let held = lease("a", "7", "2026-11-29T03:59:59.000000Z", 3);
        // Valid lease held by a: no write.
        let (r, _) = tokio::join!(lock.try_acquire_or_renew(), serve_get(&mut server, &held));
        assert!(!r.unwrap());
        tokio::time::advance(Duration::from_secs(14)).await;
        let (r, _) = tokio::join!(lock.try_acquire_or_renew(), serve_get(&mut server, &held));
        assert!(!r.unwrap(), "14 s < 15 s lease");
        tokio::time::advance(Duration::from_secs(2)).await;
        // Same record, now seen unchanged for 16 s: take over.
        let scenario = async {
            serve_get(&mut server, &held).await;
            let seen = server.next().await;
            seen.expect(Method::PUT, &format!("{PATH}?"), Some("application/json"));
            assert_eq!(
                seen.body["metadata"]["resourceVersion"], "7",
                "replace must be conditional"
            );
            assert_eq!(seen.body["spec"]["holderIdentity"], "b");
            assert_eq!(seen.body["spec"]["leaseTransitions"], 4);
            assert_eq!(seen.body["spec"]["acquireTime"], "2026-11-29T04:00:00.000000Z");
            seen.echo();
        };
        let (r, _) = tokio::join!(lock.try_acquire_or_renew(), scenario);
        assert!(r.unwrap(), "expired after 16 s");
    }

    #[tokio::test(start_paused = true)]
    async fn renewing_leader_keeps_standby_waiting_and_lost_race_is_not_leadership() {
        let (mut lock, mut server) = lock("b");
        let first = lease("a", "7", "2026-11-29T03:59:59.000000Z", 3);
        let (r, _) = tokio::join!(lock.try_acquire_or_renew(), serve_get(&mut server, &first));
        assert!(!r.unwrap());
        // a renewed (record changed) 10 s later: the 15 s start over.
        tokio::time::advance(Duration::from_secs(10)).await;
        let renewed = lease("a", "8", "2026-11-29T04:00:09.000000Z", 3);
        let (r, _) = tokio::join!(lock.try_acquire_or_renew(), serve_get(&mut server, &renewed));
        assert!(!r.unwrap());
        tokio::time::advance(Duration::from_secs(10)).await;
        let (r, _) = tokio::join!(lock.try_acquire_or_renew(), serve_get(&mut server, &renewed));
        assert!(!r.unwrap(), "only 10 s since a renewed");
        tokio::time::advance(Duration::from_secs(6)).await;
        // Expired, but another standby wins the replace.
        let scenario = async {
            serve_get(&mut server, &renewed).await;
            let seen = server.next().await;
            seen.expect(Method::PUT, &format!("{PATH}?"), Some("application/json"));
            assert_eq!(seen.body["metadata"]["resourceVersion"], "8");
            seen.fail(StatusCode::CONFLICT, "Conflict");
        };
        let (r, _) = tokio::join!(lock.try_acquire_or_renew(), scenario);
        assert!(!r.unwrap(), "409 means someone else leads");
    }

    /// The hand-over through the real loop: the standby's work does not start while the
    /// Lease is valid and starts after it expires; a leader whose renewals fail steps down.
    #[tokio::test(start_paused = true)]
    async fn run_elected_acts_only_after_expiry_and_steps_down_on_failed_renewals() {
        let (lock, mut server) = lock("b");
        let started = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = watch::channel(false);
        let (ready_tx, ready_rx) = watch::channel(false);
        let s2 = started.clone();
        let elector = tokio::spawn(run_elected(lock, tx, ready_tx, move || {
            let s = s2.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await
            }
        }));
        let held = lease("a", "7", "2026-11-29T03:59:59.000000Z", 3);
        let t0 = Instant::now();
        // Standby rounds every 2 s while a's record stays unchanged.
        loop {
            let seen = server
                .maybe_next(Duration::from_secs(3))
                .await
                .expect("a round every 2 s");
            seen.expect(Method::GET, PATH, None);
            seen.reply(StatusCode::OK, &held);
            if t0.elapsed() >= Duration::from_secs(15) {
                break;
            }
            tokio::task::yield_now().await;
            assert_eq!(
                started.load(Ordering::SeqCst),
                0,
                "acted at {:?} before expiry",
                t0.elapsed()
            );
            assert!(!*rx.borrow());
        }
        assert!(*ready_rx.borrow(), "a standby that reads the Lease is ready");
        let seen = server.next().await;
        seen.expect(Method::PUT, &format!("{PATH}?"), Some("application/json"));
        assert_eq!(seen.body["spec"]["holderIdentity"], "b");
        seen.echo();
        rx.wait_for(|l| *l).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        // Renewals now fail with 500 until the 10 s renew deadline passes.
        let lost_at = Instant::now();
        while *rx.borrow() {
            match server.maybe_next(Duration::from_secs(3)).await {
                Some(seen) => {
                    seen.expect(Method::GET, PATH, None);
                    seen.fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
                }
                None => break,
            }
            tokio::task::yield_now().await;
        }
        rx.wait_for(|l| !*l).await.unwrap();
        let after = lost_at.elapsed();
        assert!(
            after >= Duration::from_secs(10) && after < Duration::from_secs(15),
            "stepped down after {after:?}"
        );
        elector.abort();
    }
}
