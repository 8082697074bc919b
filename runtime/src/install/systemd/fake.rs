//! A [`ServiceManager`] for the installer's tests: records every call and plays scripted
//! outcomes, with the unit state moving the way systemd's does (a failed containerd start
//! leaves the unit in `activating`/`auto-restart` with its old timestamp; a good restart
//! makes it `active` with a new timestamp and main PID).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::{ActiveState, JobResult, RestartOutcome, ServiceManager, SystemdError, UnitState};

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceCall {
    DaemonReload,
    UnitState { unit: String },
    Restart { unit: String, timeout: Duration },
}

/// How the fake answers the next restart.
#[derive(Debug)]
pub enum RestartScript {
    /// Job `done`; the unit is active again with a new timestamp and main PID (the default
    /// when nothing is scripted).
    Succeed,
    /// Job `failed`; the unit stays `activating`/`auto-restart`, result `exit-code`, old
    /// timestamp, no main PID: containerd with a config it cannot load.
    FailToStart,
    /// The job ends with this result and the unit is left in `after` (its name is replaced).
    Outcome { job_result: JobResult, after: UnitState },
    /// The call itself fails.
    Error(SystemdError),
}

/// The fake. Units must be added before they can be restarted; unknown units are
/// [`SystemdError::NoSuchUnit`], as with systemd.
#[derive(Debug, Default)]
pub struct FakeServiceManager {
    calls: Vec<ServiceCall>,
    units: BTreeMap<String, UnitState>,
    restarts: VecDeque<RestartScript>,
    reloads: VecDeque<SystemdError>,
    /// Fake clocks, advanced by every start.
    now_us: u64,
    next_pid: u32,
    next_job: u32,
}

impl FakeServiceManager {
    /// No units, nothing scripted.
    pub fn new() -> Self {
        FakeServiceManager {
            now_us: 1_700_000_000_000_000,
            next_pid: 100,
            next_job: 1,
            ..Default::default()
        }
    }

    /// Adds `unit`, active and running (a `Type=notify` service with systemd's default
    /// 90 s timeouts).
    pub fn with_running_unit(mut self, unit: &str) -> Self {
        let state = self.running(unit);
        self.units.insert(unit.to_owned(), state);
        self
    }

    /// Adds `unit` in the given state.
    pub fn with_unit(mut self, state: UnitState) -> Self {
        self.units.insert(state.unit.clone(), state);
        self
    }

    /// Queues the answer to the next restart (answers are used in order).
    pub fn then_restart(&mut self, script: RestartScript) -> &mut Self {
        self.restarts.push_back(script);
        self
    }

    /// Makes the next `daemon_reload` fail with `error`.
    pub fn fail_next_reload(&mut self, error: SystemdError) -> &mut Self {
        self.reloads.push_back(error);
        self
    }

    /// Every call, in order.
    pub fn calls(&self) -> &[ServiceCall] {
        &self.calls
    }

    /// How many restarts of `unit` were asked for.
    pub fn restarts_of(&self, unit: &str) -> usize {
        self.calls
            .iter()
            .filter(|c| matches!(c, ServiceCall::Restart { unit: u, .. } if u == unit))
            .count()
    }

    fn running(&mut self, unit: &str) -> UnitState {
        self.now_us += 1_000_000;
        self.next_pid += 1;
        UnitState {
            unit: unit.to_owned(),
            load_state: "loaded".into(),
            active_state: ActiveState::Active,
            sub_state: "running".into(),
            active_enter_timestamp_us: self.now_us,
            active_enter_timestamp_monotonic_us: self.now_us - 1_600_000_000_000_000,
            invocation_id: format!("{:032x}", self.now_us),
            main_pid: self.next_pid,
            result: "success".into(),
            n_restarts: 0,
            timeout_start_us: 90_000_000,
            timeout_stop_us: 90_000_000,
        }
    }
}

impl ServiceManager for FakeServiceManager {
    fn daemon_reload(&mut self) -> Result<(), SystemdError> {
        self.calls.push(ServiceCall::DaemonReload);
        match self.reloads.pop_front() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn unit_state(&mut self, unit: &str) -> Result<UnitState, SystemdError> {
        self.calls.push(ServiceCall::UnitState {
            unit: unit.to_owned(),
        });
        self.units
            .get(unit)
            .cloned()
            .ok_or_else(|| SystemdError::NoSuchUnit {
                unit: unit.to_owned(),
            })
    }

    fn restart(&mut self, unit: &str, timeout: Duration) -> Result<RestartOutcome, SystemdError> {
        self.calls.push(ServiceCall::Restart {
            unit: unit.to_owned(),
            timeout,
        });
        let Some(before) = self.units.get(unit).cloned() else {
            return Err(SystemdError::NoSuchUnit {
                unit: unit.to_owned(),
            });
        };
        let (job_result, mut after) = match self.restarts.pop_front().unwrap_or(RestartScript::Succeed) {
            RestartScript::Succeed => {
                let mut after = self.running(unit);
                after.n_restarts = before.n_restarts;
                (JobResult::Done, after)
            }
            RestartScript::FailToStart => {
                self.now_us += 1_000_000;
                let after = UnitState {
                    active_state: ActiveState::Activating,
                    sub_state: "auto-restart".into(),
                    main_pid: 0,
                    result: "exit-code".into(),
                    invocation_id: format!("{:032x}", self.now_us),
                    ..before.clone()
                };
                (JobResult::Failed, after)
            }
            RestartScript::Outcome { job_result, after } => (job_result, after),
            RestartScript::Error(e) => return Err(e),
        };
        after.unit = unit.to_owned();
        self.units.insert(unit.to_owned(), after.clone());
        let job = format!("/org/freedesktop/systemd1/job/{}", self.next_job);
        self.next_job += 1;
        Ok(RestartOutcome {
            job,
            job_result,
            before,
            after,
            job_duration: Duration::from_millis(60),
            reconnects: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_move_the_unit_like_systemd_does() {
        let mut sm = FakeServiceManager::new().with_running_unit("containerd.service");
        sm.then_restart(RestartScript::FailToStart);
        let t = Duration::from_secs(120);

        let failed = sm.restart("containerd.service", t).unwrap();
        assert_eq!(failed.job_result, JobResult::Failed);
        assert!(!failed.succeeded());
        let stuck = sm.unit_state("containerd.service").unwrap();
        assert_eq!(
            (stuck.active_state.as_str(), stuck.sub_state.as_str()),
            ("activating", "auto-restart")
        );

        // The rollback's restart: nothing scripted, so it succeeds.
        let ok = sm.restart("containerd.service", t).unwrap();
        assert!(ok.succeeded(), "{ok}");
        assert_eq!(ok.before, stuck);
        assert!(ok.after.active_enter_timestamp_us > stuck.active_enter_timestamp_us);
        assert_ne!(ok.after.main_pid, 0);

        assert!(matches!(
            sm.restart("crio.service", t),
            Err(SystemdError::NoSuchUnit { unit }) if unit == "crio.service"
        ));
        assert_eq!(sm.restarts_of("containerd.service"), 2);
        assert_eq!(
            sm.calls()[1],
            ServiceCall::UnitState {
                unit: "containerd.service".into()
            }
        );
    }

    #[test]
    fn scripted_errors_are_returned_once() {
        let mut sm = FakeServiceManager::new().with_running_unit("containerd.service");
        sm.fail_next_reload(SystemdError::Timeout {
            what: "Reload".into(),
            after: Duration::from_secs(1),
        })
        .then_restart(RestartScript::Error(SystemdError::Disconnected {
            path: "/run/systemd/private".into(),
            what: "RestartUnit".into(),
        }));
        assert!(matches!(sm.daemon_reload(), Err(SystemdError::Timeout { .. })));
        sm.daemon_reload().unwrap();
        assert!(matches!(
            sm.restart("containerd.service", Duration::from_secs(1)),
            Err(SystemdError::Disconnected { .. })
        ));
        assert!(sm
            .restart("containerd.service", Duration::from_secs(1))
            .unwrap()
            .succeeded());
        assert_eq!(sm.calls().len(), 4);
    }
}
