#!/usr/bin/env python3
"""values.schema.json rejects bad values, with Helm 3 (gojsonschema) and Helm 4
(santhosh-tekuri/jsonschema) alike.

Error texts differ between the two Helms, so no case matches on them. Instead each bad
value comes with a good twin that differs in that one value only: the bad one must make
`helm template` and `helm lint` fail, the good one must make both pass. A failure for any
other reason (a typo in the case itself) would then show up on the good twin.

Usage: schema_test.py HELM3 HELM4     exit 0 when every case holds.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "usernsguard"


def profile(**spec_changes) -> dict:
    spec = {"runtime": "crun", "handler": "crun-userns",
            "binary": {"source": "Bundled", "path": "/usr/local/bin/crun-usernsguard"}}
    for path, value in spec_changes.items():
        node = spec
        *head, last = path.split("__")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return {"runtimeProfiles": [{"name": "crun-userns", "spec": spec}]}


# (what, bad values, good twin)
CASES = [
    ("metricsPort as a string", {"metricsPort": "9464"}, {"metricsPort": 9464}),
    ("metricsPort out of range", {"metricsPort": 70000}, {"metricsPort": 9464}),
    ("unknown CRI restart mode", profile(cri__restart="reboot"), profile(cri__restart="none")),
    ("negative restart budget", profile(rollout__maxConcurrentRestarts=-1), profile(rollout__maxConcurrentRestarts=1)),
    ("zero restart budget", profile(rollout__maxConcurrentRestarts=0), profile(rollout__maxConcurrentRestarts=2)),
    ("restart budget as a string", profile(rollout__maxConcurrentRestarts="1"), profile(rollout__maxConcurrentRestarts=1)),
    ("unknown top-level key", {"agnet": {"watchEvents": False}}, {"agent": {"watchEvents": False}}),
    ("unknown agent key", {"agent": {"hostPID": True}}, {"agent": {"watchEvents": True}}),
    ("unknown runtime", profile(runtime="youki"), profile(runtime="runc")),
    ("handler not a DNS label", profile(handler="Crun_UserNS"), profile(handler="crun-userns-2")),
    ("handler longer than 55", profile(handler="a" * 56), profile(handler="a" * 55)),
    ("unknown binary source", profile(binary__source="Docker"), profile(binary__source="Host")),
    ("unknown CRI runtime", profile(cri__runtime="docker"), profile(cri__runtime="crio")),
    ("unknown RuntimeProfile spec key", profile(runtimeClas={"create": False}), profile(runtimeClass={"create": False})),
    ("RuntimeProfile without handler", {"runtimeProfiles": [{"name": "x", "spec": {"runtime": "crun", "binary": {"path": "/x"}}}]},
     {"runtimeProfiles": [{"name": "x", "spec": {"runtime": "crun", "handler": "x", "binary": {"path": "/x"}}}]}),
    ("SelfTest interval not a duration", {"selfTest": {"spec": {"interval": "6 hours"}}}, {"selfTest": {"spec": {"interval": "6h"}}}),
    ("unknown SelfTest check", {"selfTest": {"spec": {"checks": ["mqueue"]}}}, {"selfTest": {"spec": {"checks": ["userns-joined"]}}}),
    ("agent maxUnavailable 0", {"agent": {"maxUnavailable": 0}}, {"agent": {"maxUnavailable": 2}}),
    ("controller replicas as a string", {"controller": {"replicas": "2"}}, {"controller": {"replicas": 2}}),
    ("unknown image pull policy", {"image": {"pullPolicy": "Sometimes"}}, {"image": {"pullPolicy": "Always"}}),
    ("unknown alert in disabledAlerts", {"prometheusRule": {"disabledAlerts": ["UsernsguardDown"]}},
     {"prometheusRule": {"disabledAlerts": ["UsernsguardAgentDown"]}}),
]


def runs(helm: str, values: Path) -> tuple[bool, bool]:
    t = subprocess.run([helm, "template", "x", str(CHART), "-f", str(values)], capture_output=True, text=True)
    lint = subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(values)], capture_output=True, text=True)
    return t.returncode == 0, lint.returncode == 0


def main() -> int:
    helms = {"helm3": sys.argv[1], "helm4": sys.argv[2]}
    bad = passed = 0
    # The schema itself: draft-07 and self-contained (no remote or file $ref).
    schema_text = (CHART / "values.schema.json").read_text()
    schema = json.loads(schema_text)
    refs = [v for v in _walk(schema) if isinstance(v, dict) and "$ref" in v]
    if schema.get("$schema") == "http://json-schema.org/draft-07/schema#" and all(
            r["$ref"].startswith("#/definitions/") for r in refs):
        passed += 1
        print(f"ok   values.schema.json is draft-07 with only local $refs ({len(refs)})")
    else:
        bad += 1
        print("FAIL values.schema.json must be draft-07 with local #/definitions/ $refs only")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (what, bad_values, good_values) in enumerate(CASES):
            for kind, values in (("bad", bad_values), ("good", good_values)):
                f = Path(tmp) / f"{i}-{kind}.yaml"
                f.write_text(yaml.safe_dump(values))
                for name, helm in helms.items():
                    t_ok, lint_ok = runs(helm, f)
                    want = kind == "good"
                    if t_ok == want and lint_ok == want:
                        passed += 1
                        print(f"ok   [{name}] {what}: {kind} value {'accepted' if want else 'rejected'} "
                              f"by template and lint")
                    else:
                        bad += 1
                        print(f"FAIL [{name}] {what}: {kind} value: template {'passed' if t_ok else 'failed'}, "
                              f"lint {'passed' if lint_ok else 'failed'}; values: {json.dumps(values)[:200]}")
    print(f"schema_test: {passed} passed, {bad} failed")
    return 1 if bad else 0


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


if __name__ == "__main__":
    sys.exit(main())
