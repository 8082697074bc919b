#!/usr/bin/env python3
"""The chart's node-bound admission policies, as `helm template` renders them, evaluated
with cel-python against admission requests of real shapes (requests/*.json: the agent's
node label merge-patch, the server-side apply of its NodeReport and of its status, each
from a pod-bound ServiceAccount token carrying the authentication.kubernetes.io/node-name
extra), and variants of them.

Usage: vap_test.py RENDERED.yaml     exit 0 when every case gives the expected verdict.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import evaluate  # noqa: E402

REQUESTS = Path(__file__).resolve().parent / "requests"
NODE_EXTRA = "authentication.kubernetes.io/node-name"


def base(name: str) -> dict:
    return json.loads((REQUESTS / f"{name}.json").read_text())


def variant(name: str, change) -> dict:
    review = copy.deepcopy(base(name))
    change(review["request"])
    return review


def labels(q):
    return q["object"]["metadata"]["labels"]


def set_node(node):
    def change(q):
        q["userInfo"]["extra"][NODE_EXTRA] = [node]
    return change


def chain(*changes):
    def change(q):
        for c in changes:
            c(q)
    return change


def rename_object(name):
    """Another node's object: the request names it, the object and old object carry it."""
    def change(q):
        q["name"] = name
        for key in ("object", "oldObject"):
            if q.get(key):
                q[key]["metadata"]["name"] = name
                if "spec" in q[key] and "nodeName" in q[key]["spec"]:
                    q[key]["spec"]["nodeName"] = name
    return change


def drop_node_extra(q):
    del q["userInfo"]["extra"][NODE_EXTRA]


def drop_all_extra(q):
    del q["userInfo"]["extra"]  # a legacy Secret-based token: no extra at all


def two_node_values(q):
    q["userInfo"]["extra"][NODE_EXTRA] = ["worker-1", "worker-2"]


def other_user(q):
    q["userInfo"]["username"] = "system:serviceaccount:kube-system:node-controller"


N, R, S = "node-patch-own-labels", "nodereport-apply-own", "nodereport-status-own"
CASES = [
    # (description, request, change, expected verdict)
    ("agent sets its own node's usernsguard.io/ label", N, lambda q: None, "admitted"),
    ("agent removes its own usernsguard.io/ label", N,
     lambda q: labels(q).pop("usernsguard.io/userns.runc"), "admitted"),
    ("agent labels a node that had no labels", N,
     lambda q: (q["oldObject"]["metadata"].pop("labels"),
                q["object"]["metadata"].__setitem__("labels", {"usernsguard.io/userns.runc": "pass"})), "admitted"),
    ("agent patches another node", N, rename_object("worker-2"), "denied"),
    ("agent on worker-2 patches worker-1", N, set_node("worker-2"), "denied"),
    ("agent adds a label outside usernsguard.io/", N,
     lambda q: labels(q).__setitem__("node-role.kubernetes.io/control-plane", ""), "denied"),
    ("agent changes a label outside usernsguard.io/", N,
     lambda q: labels(q).__setitem__("kubernetes.io/hostname", "evil"), "denied"),
    ("agent removes a label outside usernsguard.io/", N,
     lambda q: labels(q).pop("node.kubernetes.io/instance-type"), "denied"),
    ("agent adds a label under a look-alike prefix usernsguard.iox/", N,
     lambda q: labels(q).__setitem__("usernsguard.iox/evil", "1"), "denied"),
    ("agent adds a taint", N,
     lambda q: q["object"]["spec"].__setitem__("taints", [{"key": "x", "effect": "NoSchedule"}]), "denied"),
    ("agent cordons the node", N, lambda q: q["object"]["spec"].__setitem__("unschedulable", True), "denied"),
    ("agent adds an annotation", N,
     lambda q: q["object"]["metadata"]["annotations"].__setitem__("a", "b"), "denied"),
    ("agent adds a finalizer", N,
     lambda q: q["object"]["metadata"].__setitem__("finalizers", ["example.com/x"]), "denied"),
    ("token without the node-name extra", N, drop_node_extra, "denied"),
    ("token without any extra (legacy Secret token)", N, drop_all_extra, "denied"),
    ("token with two node names", N, two_node_values, "denied"),
    ("someone else patches the node (policy does not apply)", N,
     chain(other_user, lambda q: q["object"]["spec"].__setitem__("taints", [{"key": "x", "effect": "NoSchedule"}])),
     "not-applicable"),
    ("agent writes nodes/status (not matched; its RBAC has no nodes/status)", N,
     lambda q: q.__setitem__("subResource", "status"), "not-applicable"),
    ("agent creates its own NodeReport (server-side apply)", R, lambda q: None, "admitted"),
    ("agent applies its own NodeReport's status", S, lambda q: None, "admitted"),
    ("agent creates another node's NodeReport", R, rename_object("worker-2"), "denied"),
    ("agent applies another node's NodeReport status", S, rename_object("worker-2"), "denied"),
    ("agent on worker-2 writes worker-1's NodeReport", S, set_node("worker-2"), "denied"),
    ("agent's own NodeReport naming another node in spec.nodeName", R,
     lambda q: q["object"]["spec"].__setitem__("nodeName", "worker-2"), "denied"),
    ("NodeReport from a token without the node-name extra", R, drop_node_extra, "denied"),
    ("NodeReport status from a token without any extra", S, drop_all_extra, "denied"),
    ("someone else writes a NodeReport (policy does not apply)", S,
     chain(other_user, rename_object("worker-2")), "not-applicable"),
]


def combined(policies: list[dict], review: dict) -> tuple[str, list[str]]:
    """All policies together, as the apiserver runs every bound policy: any denial wins."""
    verdicts = [evaluate(p, review) for p in policies]
    denied = [m for v, msgs in verdicts if v == "denied" for m in msgs]
    if denied:
        return "denied", denied
    if any(v == "admitted" for v, _ in verdicts):
        return "admitted", [m for v, msgs in verdicts if v == "admitted" for m in msgs]
    return "not-applicable", [m for _, msgs in verdicts for m in msgs]


def main() -> int:
    docs = [d for d in yaml.safe_load_all(Path(sys.argv[1]).read_text()) if isinstance(d, dict)]
    policies = [d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy"]
    bindings = {d["spec"]["policyName"]: d for d in docs if d.get("kind") == "ValidatingAdmissionPolicyBinding"}
    bad = 0
    if len(policies) != 2:
        print(f"FAIL expected 2 ValidatingAdmissionPolicies in {sys.argv[1]}, found {len(policies)}")
        return 1
    for p in policies:
        b = bindings.get(p["metadata"]["name"])
        if not b or b["spec"].get("validationActions") != ["Deny"]:
            print(f"FAIL policy {p['metadata']['name']} has no binding with validationActions [Deny]")
            bad += 1
        if p["spec"].get("failurePolicy") != "Fail":
            print(f"FAIL policy {p['metadata']['name']} must fail closed (failurePolicy Fail)")
            bad += 1
    for desc, name, change, want in CASES:
        got, msgs = combined(policies, variant(name, change))
        ok = got == want
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {desc}: {got.upper()} ({'; '.join(msgs)[:150]})")
    print(f"vap_test: {len(CASES) + 2 * len(policies) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
