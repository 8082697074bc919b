//! A fake self-test engine for the node reconciler's tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use usernsguard_runtime::report::{SelfTestReport, Verdict};

use super::builders::{facts, handler_report};
use crate::node::runner::{RunRequest, SelfTestRunner};

/// A self-test engine that answers from a table and records what it was asked. Each run
/// gets a new `startedAt` and durations, as the real engine's would.
#[derive(Debug, Default)]
pub struct FakeRunner {
    pub verdicts: Mutex<BTreeMap<String, Verdict>>,
    pub calls: Mutex<Vec<RunRequest>>,
}

impl FakeRunner {
    pub fn with<const N: usize>(verdicts: [(&str, Verdict); N]) -> Arc<Self> {
        let r = FakeRunner::default();
        r.set(verdicts);
        Arc::new(r)
    }

    pub fn set<const N: usize>(&self, verdicts: [(&str, Verdict); N]) {
        *self.verdicts.lock().unwrap() = verdicts.iter().map(|(h, v)| (h.to_string(), *v)).collect();
    }

    pub fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

impl SelfTestRunner for FakeRunner {
    fn run(&self, req: &RunRequest) -> SelfTestReport {
        let mut calls = self.calls.lock().unwrap();
        calls.push(req.clone());
        let n = calls.len();
        let verdicts = self.verdicts.lock().unwrap();
        let handlers = verdicts
            .iter()
            .filter(|(h, _)| req.handlers.is_empty() || req.handlers.contains(h))
            .map(|(h, v)| {
                let mut r = handler_report(h, *v);
                for c in &mut r.checks {
                    c.duration_seconds = 0.1 * n as f64;
                }
                r
            })
            .collect();
        SelfTestReport {
            started_at: format!("2026-11-29T04:{:02}:00Z", n % 60),
            duration_seconds: 0.5 * n as f64,
            node: facts(),
            cri: None,
            handlers,
            problem: None,
        }
    }
}
