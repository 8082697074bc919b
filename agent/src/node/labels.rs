//! The one way the agent changes its Node's labels: a JSON merge patch over the label keys
//! under one prefix that it owns (`usernsguard.io/userns.`, `usernsguard.io/runtime.`),
//! setting the wanted ones and nulling the stale ones. A merge patch, not server-side apply,
//! so labels an older agent or a human set under the prefix are removed too.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// The patch that makes the labels under `prefix` equal `desired`; None when they are.
pub fn merge_patch(
    current: &BTreeMap<String, String>,
    prefix: &str,
    desired: &BTreeMap<String, String>,
) -> Option<Value> {
    let mut labels = serde_json::Map::new();
    for k in current
        .keys()
        .filter(|k| k.starts_with(prefix) && !desired.contains_key(*k))
    {
        labels.insert(k.clone(), Value::Null);
    }
    for (k, v) in desired {
        if current.get(k) != Some(v) {
            labels.insert(k.clone(), Value::String(v.clone()));
        }
    }
    (!labels.is_empty()).then(|| json!({"metadata": {"labels": labels}}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map<const N: usize>(kv: [(&str, &str); N]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn sets_changes_and_removes_only_under_the_prefix() {
        let current = map([
            ("usernsguard.io/runtime.crun", "pending"),
            ("usernsguard.io/runtime.old", "installed"),
            ("usernsguard.io/userns.crun", "pass"),
            ("kubernetes.io/hostname", "n1"),
        ]);
        let desired = map([
            ("usernsguard.io/runtime.crun", "installed"),
            ("usernsguard.io/runtime.runc-1-2", "failed"),
        ]);
        let patch = merge_patch(&current, "usernsguard.io/runtime.", &desired).unwrap();
        assert_eq!(
            patch,
            json!({"metadata": {"labels": {
                "usernsguard.io/runtime.crun": "installed",
                "usernsguard.io/runtime.old": null,
                "usernsguard.io/runtime.runc-1-2": "failed",
            }}})
        );
        let current = map([
            ("usernsguard.io/runtime.crun", "installed"),
            ("usernsguard.io/userns.x", "fail"),
        ]);
        let desired = map([("usernsguard.io/runtime.crun", "installed")]);
        assert_eq!(merge_patch(&current, "usernsguard.io/runtime.", &desired), None);
    }
}
