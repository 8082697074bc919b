#!/usr/bin/env python3
"""What the chart renders, checked object by object against what the brief, DESIGN.md and
the binary require, with Helm 3 and Helm 4 (each check runs with both).

Usage: render_test.py HELM3 HELM4 USERNSGUARD_BINARY     exit 0 when every check holds.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "usernsguard"
NS, RELEASE = "usernsguard-system", "usernsguard"
IMAGE = "ghcr.io/usernsguard/usernsguard:0.1.0"
MONITORING = ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor",
              "monitoring.coreos.com/v1/PrometheusRule"]
SERVED_CRS = ["usernsguard.io/v1alpha1/SelfTest", "usernsguard.io/v1alpha1/RuntimeProfile"]
HOOK_KEYS = {"helm.sh/hook", "helm.sh/hook-weight", "helm.sh/hook-delete-policy"}
# Flags the chart passes that the lead is adding to the binary (the brief names each);
# a strict expected failure: the check fails as soon as the binary has one of them, so
# that the entry is removed here and the flag checked for real.
PENDING_FLAGS: dict[tuple[str, str], str] = {}

failures: list[str] = []
passes = 0


def check(cond: bool, msg: str, detail: str = "") -> bool:
    global passes
    if cond:
        passes += 1
        print(f"ok   {msg}")
    else:
        failures.append(msg)
        print(f"FAIL {msg}" + (f"\n       {detail}" if detail else ""))
    return cond


def helm(h: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([h, *args], capture_output=True, text=True)


def render(h: str, *, values: list[str] = (), sets: list[str] = (), kube: str = "1.35.0",
           api: list[str] = (), chart: Path = CHART) -> list[dict]:
    args = ["template", RELEASE, str(chart), "-n", NS, "--kube-version", kube]
    for v in values:
        args += ["-f", str(CHART / v)]
    for s in sets:
        args += ["--set", s]
    for a in api:
        args += ["-a", a]
    r = helm(h, *args)
    if r.returncode != 0:
        raise SystemExit(f"FAIL helm template {' '.join(args)}:\n{r.stderr}")
    return [d for d in yaml.safe_load_all(r.stdout) if isinstance(d, dict)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise SystemExit(f"FAIL expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def kinds(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def rules_of(role: dict) -> set[tuple[str, str, str, str]]:
    return {(g, r, v, ",".join(rule.get("resourceNames", [])))
            for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def expand(*specs) -> set[tuple[str, str, str, str]]:
    out = set()
    for groups, resources, verbs, *names in specs:
        for g in groups:
            for r in resources:
                for v in verbs:
                    out.add((g, r, v, ",".join(names[0]) if names else ""))
    return out


def test_files_crds_are_repo_crds():
    link = CHART / "files" / "crds"
    check(link.is_symlink() and link.resolve() == (ROOT / "crds").resolve(),
          "charts/usernsguard/files/crds is the repository's crds/ (a symlink: one generated copy)",
          f"{link} -> {link.resolve() if link.exists() else 'missing'}")


def test_crds(h: str, tag: str):
    docs = render(h)
    crds = {d["metadata"]["name"]: d for d in kinds(docs, "CustomResourceDefinition")}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        src = yaml.safe_load(path.read_text())
        got = crds.get(src["metadata"]["name"])
        if not check(got is not None, f"[{tag}] CRD {src['metadata']['name']} rendered"):
            continue
        meta = got["metadata"]
        check(meta.get("annotations", {}).get("helm.sh/resource-policy") == "keep",
              f"[{tag}] CRD {src['metadata']['name']} has helm.sh/resource-policy: keep")
        check(not HOOK_KEYS & set(meta.get("annotations", {})),
              f"[{tag}] CRD {src['metadata']['name']} is an ordinary release object (upgraded by helm upgrade), not a hook")
        # Helm's fromYaml/toYaml writes `600.0` as `600`: the same number to the API server.
        def strip(d):
            return json.loads(json.dumps({k: v for k, v in d.items() if k != "metadata"}
                                         | {"name": d["metadata"]["name"]}),
                              parse_float=lambda f: int(float(f)) if float(f).is_integer() else float(f))
        check(json.dumps(strip(got), sort_keys=True) == json.dumps(strip(src), sort_keys=True),
              f"[{tag}] CRD {src['metadata']['name']} equals crds/{path.name} apart from labels and annotations")
    check(not kinds(render(h, sets=["crds.install=false"]), "CustomResourceDefinition"),
          f"[{tag}] crds.install=false renders no CRD")
    nokeep = kinds(render(h, sets=["crds.keep=false"]), "CustomResourceDefinition")
    check(nokeep and all("helm.sh/resource-policy" not in d["metadata"].get("annotations", {}) for d in nokeep),
          f"[{tag}] crds.keep=false drops the keep annotation")


def test_agent(h: str, tag: str):
    docs = render(h)
    ds = one(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    c = container(ds)
    check(c["image"] == IMAGE, f"[{tag}] agent image {IMAGE} (tag = appVersion)", c["image"])
    check(c["imagePullPolicy"] == "IfNotPresent", f"[{tag}] agent imagePullPolicy IfNotPresent")
    want = ["agent", "--host-root", "/host", "--listen", "0.0.0.0:9464", "--probe-image", IMAGE]
    check(c.get("command") is None and c["args"] == want,
          f"[{tag}] agent args: {' '.join(want)}", str(c.get("command")) + " " + str(c["args"]))
    env = {e["name"]: e for e in c["env"]}
    check(env.get("NODE_NAME", {}).get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}},
          f"[{tag}] agent NODE_NAME from the downward API spec.nodeName")
    check(spec["volumes"] == [{"name": "host-root", "hostPath": {"path": "/", "type": "Directory"}}],
          f"[{tag}] agent has exactly one volume: hostPath /", str(spec["volumes"]))
    check(c["volumeMounts"] == [{"name": "host-root", "mountPath": "/host", "mountPropagation": "HostToContainer"}],
          f"[{tag}] agent mounts it at /host with HostToContainer propagation", str(c["volumeMounts"]))
    sc = c["securityContext"]
    check(sc.get("privileged") is True and sc.get("runAsUser") == 0, f"[{tag}] agent privileged, as uid 0")
    check(not any(spec.get(k) for k in ("hostPID", "hostNetwork", "hostIPC")),
          f"[{tag}] agent without hostPID, hostNetwork, hostIPC")
    check(spec.get("priorityClassName") == "system-node-critical", f"[{tag}] agent priorityClassName system-node-critical")
    check(spec.get("tolerations") == [{"operator": "Exists"}], f"[{tag}] agent tolerates every taint")
    check(ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
          f"[{tag}] agent rolling update maxUnavailable 1")
    check(spec.get("terminationGracePeriodSeconds") == 30, f"[{tag}] agent terminationGracePeriodSeconds 30")
    check(c["resources"] == {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
          f"[{tag}] agent resources from values", str(c["resources"]))
    check(c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}],
          f"[{tag}] agent port metrics 9464")
    check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"} and
          c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"},
          f"[{tag}] agent liveness /healthz, readiness /readyz on port metrics")
    check(spec["serviceAccountName"] == "usernsguard-agent", f"[{tag}] agent ServiceAccount usernsguard-agent")

    docs = render(h, values=["ci/all-values.yaml"])
    c = container(one(docs, "DaemonSet"))
    check(c["args"][c["args"].index("--cri-socket") + 1] == "/run/k3s/containerd/containerd.sock"
          if "--cri-socket" in c["args"] else False,
          f"[{tag}] agent.criSocket -> --cri-socket <host path>", str(c["args"]))
    check("--watch-events=false" in c["args"], f"[{tag}] agent.watchEvents=false -> --watch-events=false")
    check(one(docs, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%",
          f"[{tag}] agent.maxUnavailable passes a percentage through")
    c = container(one(render(h, sets=["image.digest=sha256:" + "a" * 64]), "DaemonSet"))
    want = "ghcr.io/usernsguard/usernsguard@sha256:" + "a" * 64
    check(c["image"] == want and c["args"][c["args"].index("--probe-image") + 1] == want,
          f"[{tag}] image.digest pins image and --probe-image by digest")


def test_controller(h: str, tag: str):
    docs = render(h)
    dep = one(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    c = container(dep)
    check(dep["spec"]["replicas"] == 2, f"[{tag}] controller replicas 2")
    check(c["image"] == IMAGE and c["args"] == ["controller", "--listen", "0.0.0.0:9464"],
          f"[{tag}] controller: {IMAGE} controller --listen 0.0.0.0:9464", str(c["args"]))
    env = {e["name"]: e.get("valueFrom") for e in c["env"]}
    check(env.get("POD_NAMESPACE") == {"fieldRef": {"fieldPath": "metadata.namespace"}} and
          env.get("POD_NAME") == {"fieldRef": {"fieldPath": "metadata.name"}},
          f"[{tag}] controller POD_NAMESPACE and POD_NAME from the downward API")
    psc, sc = spec["securityContext"], c["securityContext"]
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0 and
          psc.get("seccompProfile") == {"type": "RuntimeDefault"},
          f"[{tag}] controller runs as non-root with seccomp RuntimeDefault")
    check(sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
          f"[{tag}] controller: read-only root filesystem, no privilege escalation, all capabilities dropped", str(sc))
    check(c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"} and
          c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"} and
          c["ports"][0]["containerPort"] == 9464,
          f"[{tag}] controller probes /healthz, /readyz on port metrics 9464")
    check(spec["serviceAccountName"] == "usernsguard-controller", f"[{tag}] controller ServiceAccount usernsguard-controller")
    dep = one(render(h, values=["ci/all-values.yaml"]), "Deployment")
    check(dep["spec"]["replicas"] == 3, f"[{tag}] controller.replicas from values")


def test_rbac(h: str, tag: str):
    docs = render(h)
    agent = rules_of(one(docs, "ClusterRole", "usernsguard-agent"))
    want_agent = expand(
        ([""], ["nodes"], ["get", "list", "watch", "patch"]),
        ([""], ["pods"], ["get", "list", "watch"]),
        ([""], ["events"], ["get", "list", "watch", "create", "patch"]),
        (["events.k8s.io"], ["events"], ["create", "patch"]),
        (["node.k8s.io"], ["runtimeclasses"], ["get", "list", "watch"]),
        (["usernsguard.io"], ["nodereports", "nodereports/status"], ["get", "list", "watch", "create", "patch"]),
        (["usernsguard.io"], ["selftests", "runtimeprofiles"], ["get", "list", "watch"]))
    check(agent == want_agent, f"[{tag}] agent ClusterRole is exactly the least-privilege set",
          f"extra {sorted(agent - want_agent)}, missing {sorted(want_agent - agent)}")
    check(not any(r in ("nodes/status", "*") or v == "*" for _, r, v, _ in agent),
          f"[{tag}] agent has no nodes/status and no wildcard")
    ctrl = rules_of(one(docs, "ClusterRole", "usernsguard-controller"))
    want_ctrl = expand(
        (["node.k8s.io"], ["runtimeclasses"], ["get", "list", "watch", "create", "patch", "update", "delete"]),
        (["usernsguard.io"], ["selftests", "runtimeprofiles"], ["get", "list", "watch", "patch", "update"]),
        (["usernsguard.io"], ["selftests/status", "runtimeprofiles/status"], ["patch", "update"]),
        (["usernsguard.io"], ["runtimeprofiles"], ["delete"]),
        (["usernsguard.io"], ["nodereports"], ["get", "list", "watch"]),
        ([""], ["nodes"], ["get", "list", "watch"]),
        ([""], ["events"], ["create", "patch"]),
        (["events.k8s.io"], ["events"], ["create", "patch"]))
    check(ctrl == want_ctrl, f"[{tag}] controller ClusterRole is exactly the least-privilege set",
          f"extra {sorted(ctrl - want_ctrl)}, missing {sorted(want_ctrl - ctrl)}")
    roles = {r["metadata"]["name"]: r for r in kinds(docs, "Role")}
    check(sorted(roles) == ["usernsguard-agent-restart-budget", "usernsguard-controller-leader-election"],
          f"[{tag}] two Roles: the controller's leader election, the agents' restart budgets", str(sorted(roles)))
    role = roles.get("usernsguard-controller-leader-election", {"metadata": {}, "rules": []})
    check(role["metadata"].get("namespace") == NS and rules_of(role) == expand(
        (["coordination.k8s.io"], ["leases"], ["create"]),
        (["coordination.k8s.io"], ["leases"], ["get", "update"], ["usernsguard-controller"])),
        f"[{tag}] controller Role: the Lease usernsguard-controller in {NS} only")
    role = roles.get("usernsguard-agent-restart-budget", {"metadata": {}, "rules": []})
    check(role["metadata"].get("namespace") == NS and rules_of(role) == expand(
        (["coordination.k8s.io"], ["leases"], ["get", "create", "update"])),
        f"[{tag}] agent Role: Leases in {NS} only (restart budgets), no delete, no list")
    for b in kinds(docs, "ClusterRoleBinding") + kinds(docs, "RoleBinding"):
        s = b["subjects"]
        check(len(s) == 1 and s[0]["kind"] == "ServiceAccount" and s[0]["namespace"] == NS and
              s[0]["name"] == b["roleRef"]["name"].removesuffix("-leader-election").removesuffix("-restart-budget"),
              f"[{tag}] {b['kind']} {b['metadata']['name']} binds only its component's ServiceAccount")
    for d in kinds(docs, "ServiceAccount") + kinds(docs, "ClusterRole") + kinds(docs, "ClusterRoleBinding") \
            + kinds(docs, "Role") + kinds(docs, "RoleBinding"):
        check(not HOOK_KEYS & set(d["metadata"].get("annotations", {})),
              f"[{tag}] {d['kind']} {d['metadata']['name']} is an ordinary object (alive while the pre-delete hook runs)")


def test_admission_policy(h: str, tag: str):
    for kube in ("1.30.0", "1.35.0"):
        docs = render(h, kube=kube)
        vaps = kinds(docs, "ValidatingAdmissionPolicy")
        check(len(vaps) == 2 and len(kinds(docs, "ValidatingAdmissionPolicyBinding")) == 2,
              f"[{tag}] Kubernetes {kube}: two ValidatingAdmissionPolicies with bindings")
        for v in vaps:
            cond = v["spec"]["matchConditions"][0]["expression"]
            check("system:serviceaccount:usernsguard-system:usernsguard-agent" in cond,
                  f"[{tag}] {v['metadata']['name']} applies to the agent's ServiceAccount only")
    check(not kinds(render(h, kube="1.29.0"), "ValidatingAdmissionPolicy"),
          f"[{tag}] Kubernetes 1.29: no ValidatingAdmissionPolicy (v1 is 1.30+)")
    check(not kinds(render(h, sets=["admissionPolicy.enabled=false"]), "ValidatingAdmissionPolicy"),
          f"[{tag}] admissionPolicy.enabled=false: no policy")


def test_custom_resources(h: str, tag: str):
    first = render(h, values=["ci/all-values.yaml"])
    later = render(h, values=["ci/all-values.yaml"], api=SERVED_CRS)
    for docs, when in ((first, "first install"), (later, "upgrade")):
        crs = kinds(docs, "SelfTest") + kinds(docs, "RuntimeProfile")
        check(len(crs) == 4, f"[{tag}] {when}: the SelfTest and the 3 RuntimeProfiles of all-values.yaml")
        for cr in crs:
            ann = cr["metadata"].get("annotations", {})
            labels = cr["metadata"].get("labels", {})
            if when == "first install":
                check(ann.get("helm.sh/hook") == "post-install" and
                      ann.get("meta.helm.sh/release-name") == RELEASE and
                      ann.get("meta.helm.sh/release-namespace") == NS and
                      labels.get("app.kubernetes.io/managed-by") == "Helm",
                      f"[{tag}] {when}: {cr['kind']} {cr['metadata']['name']} is a post-install hook "
                      f"with Helm's ownership metadata (the next upgrade adopts it)")
            else:
                check(not HOOK_KEYS & set(ann),
                      f"[{tag}] {when}: {cr['kind']} {cr['metadata']['name']} is an ordinary object, patched in place")
    st = one(render(h), "SelfTest")
    check(st["metadata"]["name"] == "default" and st["spec"] == {"interval": "6h"},
          f"[{tag}] default SelfTest 'default' with interval 6h")
    check(not kinds(render(h, sets=["selfTest.enabled=false"]), "SelfTest"), f"[{tag}] selfTest.enabled=false: none")
    rtp = {d["metadata"]["name"]: d["spec"] for d in kinds(first, "RuntimeProfile")}
    values = yaml.safe_load((CHART / "ci" / "all-values.yaml").read_text())
    check(rtp == {p["name"]: p["spec"] for p in values["runtimeProfiles"]},
          f"[{tag}] RuntimeProfile specs are passed through unchanged")


def test_monitoring(h: str, tag: str):
    docs = render(h, values=["ci/all-values.yaml"], api=MONITORING)
    sms = kinds(docs, "ServiceMonitor")
    check(len(sms) == 2 and not kinds(docs, "PodMonitor"), f"[{tag}] ServiceMonitors for agent and controller")
    for sm in sms:
        ep = sm["spec"]["endpoints"][0]
        check(ep["honorLabels"] is True and ep["port"] == "metrics" and ep["path"] == "/metrics",
              f"[{tag}] {sm['metadata']['name']}: honorLabels, port metrics, /metrics")
        check(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack",
              f"[{tag}] {sm['metadata']['name']}: additionalLabels")
        check(sm["spec"]["jobLabel"] == "usernsguard.io/job", f"[{tag}] {sm['metadata']['name']}: jobLabel usernsguard.io/job")
    svc = {d["metadata"]["name"]: d for d in kinds(docs, "Service")}
    agent_svc = svc.get("usernsguard-agent-metrics")
    check(agent_svc is not None and agent_svc["metadata"]["labels"].get("usernsguard.io/job") == "usernsguard-agent"
          and agent_svc["spec"]["ports"][0]["port"] == 9464,
          f"[{tag}] agent metrics Service: port 9464, job label usernsguard-agent (the alerts' job)")
    check("usernsguard-controller-metrics" in svc, f"[{tag}] controller metrics Service")
    ds = one(docs, "DaemonSet")
    check(ds["spec"]["template"]["metadata"]["labels"].get("usernsguard.io/job") == "usernsguard-agent",
          f"[{tag}] agent pods carry the job label (PodMonitor jobLabel)")
    check(not kinds(render(h, values=["ci/all-values.yaml"]), "ServiceMonitor") and
          not kinds(render(h, values=["ci/all-values.yaml"]), "PrometheusRule"),
          f"[{tag}] without the monitoring.coreos.com capabilities: no ServiceMonitor, no PrometheusRule")
    pm = kinds(render(h, values=["ci/podmonitor-values.yaml"], api=MONITORING), "PodMonitor")
    check(len(pm) == 2 and all(p["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True for p in pm),
          f"[{tag}] podMonitor: PodMonitors for agent and controller, honorLabels")
    r = helm(h, "template", RELEASE, str(CHART), "-n", NS, "--set", "serviceMonitor.enabled=true",
             "--set", "podMonitor.enabled=true", *[x for a in MONITORING for x in ("-a", a)])
    check(r.returncode != 0, f"[{tag}] serviceMonitor and podMonitor together are refused")


def extract_rules(docs: list[dict]) -> dict | None:
    pr = [d for d in docs if d["kind"] == "PrometheusRule"]
    return pr[0]["spec"] if pr else None


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True)


def test_prometheus_rule(h: str, tag: str, work: Path):
    src = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    spec = extract_rules(render(h, sets=["prometheusRule.enabled=true"], api=MONITORING))
    check(spec == src, f"[{tag}] PrometheusRule spec with default values equals files/alerts.yaml")
    # The rendered rules pass promtool's check and the same unit tests as the file.
    rules = work / f"rendered-{tag}.yaml"
    rules.write_text(yaml.safe_dump(spec))
    r = promtool("check", "rules", str(rules))
    check(r.returncode == 0, f"[{tag}] promtool check rules on the rendered PrometheusRule", r.stdout + r.stderr)
    tests = yaml.safe_load((ROOT / "tests" / "chart" / "alerts_test.yaml").read_text())
    tests["rule_files"] = [rules.name]
    (work / f"alerts_test-{tag}.yaml").write_text(yaml.safe_dump(tests))
    r = promtool("test", "rules", str(work / f"alerts_test-{tag}.yaml"))
    check(r.returncode == 0, f"[{tag}] promtool test rules on the rendered PrometheusRule", r.stdout + r.stderr)

    def rule(spec, name):
        return next((r for g in spec["groups"] for r in g["rules"] if name in (r.get("alert"), r.get("record"))), None)

    spec = extract_rules(render(h, values=["ci/all-values.yaml"], api=MONITORING))
    check(rule(spec, "usernsguard:selftest_interval_seconds")["expr"] == "vector(7200)",
          f"[{tag}] the stale-alert parameter follows selfTest.spec.interval (2h -> 7200)")
    check(all(r["labels"].get("team") == "platform" and r["labels"].get("severity") == "warning"
              for g in spec["groups"] for r in g["rules"] if "alert" in r),
          f"[{tag}] additionalRuleLabels on every alert, severity kept")
    spec = extract_rules(render(h, sets=["prometheusRule.enabled=true", "prometheusRule.selfTestInterval=1h30m"],
                                api=MONITORING))
    check(rule(spec, "usernsguard:selftest_interval_seconds")["expr"] == "vector(5400)",
          f"[{tag}] prometheusRule.selfTestInterval wins (1h30m -> 5400)")
    spec = extract_rules(render(h, values=["ci/podmonitor-values.yaml"], api=MONITORING))
    check(rule(spec, "UsernsguardSelfTestStale") is None and rule(spec, "usernsguard:selftest_interval_seconds") is None,
          f"[{tag}] a SelfTest without interval leaves the stale alert and its parameter out")
    check(rule(spec, "UsernsguardContainerRuntimeRestarting") is None and rule(spec, "UsernsguardAgentDown"),
          f"[{tag}] disabledAlerts leaves exactly those out")


def test_dashboard(h: str, tag: str):
    docs = render(h)
    cm = one(docs, "ConfigMap")
    check(cm["data"]["usernsguard.json"] == (CHART / "files" / "dashboard.json").read_text().rstrip("\n"),
          f"[{tag}] dashboard ConfigMap holds files/dashboard.json unchanged (not templated)")
    check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", f"[{tag}] dashboard labelled grafana_dashboard: \"1\"")
    cm = one(render(h, sets=["dashboard.labelKey=my_dash", "dashboard.labelValue=yes", "dashboard.namespace=monitoring"]),
             "ConfigMap")
    check(cm["metadata"]["labels"].get("my_dash") == "yes" and cm["metadata"]["namespace"] == "monitoring",
          f"[{tag}] dashboard label key/value and namespace configurable")


def test_uninstall_hook(h: str, tag: str):
    job = one(render(h), "Job")
    ann = job["metadata"]["annotations"]
    c = container(job)
    check(ann.get("helm.sh/hook") == "pre-delete", f"[{tag}] uninstall Job is a pre-delete hook")
    check(c["args"] == ["controller", "--uninstall-all", "--timeout", "10m"] and c["image"] == IMAGE,
          f"[{tag}] uninstall Job runs usernsguard controller --uninstall-all --timeout 10m", str(c["args"]))
    check(job["spec"]["template"]["spec"]["serviceAccountName"] == "usernsguard-controller",
          f"[{tag}] uninstall Job uses the controller's ServiceAccount")
    check(not kinds(render(h, sets=["uninstall.enabled=false"]), "Job"), f"[{tag}] uninstall.enabled=false: no Job")


def test_notes(h: str, tag: str, work: Path):
    # NOTES.txt cannot be shown by `helm template`; render it through a copy of the chart
    # in which it becomes a named template printed into a ConfigMap.
    copy = work / f"notes-{tag}" / "usernsguard"
    shutil.copytree(CHART, copy)
    notes = (copy / "templates" / "NOTES.txt").read_text()
    (copy / "templates" / "NOTES.txt").unlink()
    (copy / "templates" / "_notes.tpl").write_text('{{- define "notes" -}}\n' + notes + "\n{{- end }}\n")
    (copy / "templates" / "notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: {{ include "notes" . | quote }}\n')
    for kube, warn in (("1.35.0", False), ("1.29.0", True)):
        text = one(render(h, kube=kube, chart=copy), "ConfigMap", "notes")["data"]["notes"]
        check(all(s in text for s in ("kubectl get nodereports", "kubectl get selftests", "kubectl get nodes -L",
                                      "usernsguard-dashboard", "helm uninstall")),
              f"[{tag}] NOTES.txt ({kube}) says what to run next: nodereports, selftests, node labels, dashboard, uninstall")
        check(("NOT bound to its own node" in text) == warn,
              f"[{tag}] NOTES.txt ({kube}) {'warns' if warn else 'does not warn'} about node-bound writes")


def test_binary(binary: Path, docs: list[dict]):
    """The flags and port the chart passes are the binary's (by its --help)."""
    ds, dep, job = one(docs, "DaemonSet"), one(docs, "Deployment"), one(docs, "Job")
    passed_flags = {
        "agent": [a.split("=")[0] for a in container(ds)["args"] if a.startswith("--")] + ["--cri-socket", "--watch-events"],
        "controller": [a.split("=")[0] for a in container(dep)["args"] + container(job)["args"] if a.startswith("--")],
    }
    for sub, flags in passed_flags.items():
        r = subprocess.run([str(binary), sub, "--help"], capture_output=True, text=True)
        if not check(r.returncode == 0, f"usernsguard {sub} --help runs"):
            continue
        for flag in sorted(set(flags)):
            present = re.search(rf"(^|\s){re.escape(flag)}[\s=\[<]", r.stdout) is not None
            pending = PENDING_FLAGS.get((sub, flag))
            if pending and not present:
                print(f"xfail usernsguard {sub} {flag}: not in this binary yet ({pending})")
            elif pending and present:
                check(False, f"usernsguard {sub} {flag} now exists: remove it from PENDING_FLAGS in {Path(__file__).name}")
            else:
                check(present, f"usernsguard {sub} accepts {flag}, which the chart passes")
        m = re.search(r"--listen <[A-Z]+>.*?\[default: ([0-9.]+):(\d+)\]", r.stdout, re.S)
        check(m is not None and m.group(2) == "9464",
              f"usernsguard {sub} listens on port 9464 by default, the chart's metricsPort",
              m.group(0) if m else r.stdout)


def main() -> int:
    helm3, helm4, binary = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    work = Path(tempfile.mkdtemp(prefix="ug-chart-render."))
    try:
        test_files_crds_are_repo_crds()
        for h, tag in ((helm3, "helm3"), (helm4, "helm4")):
            test_crds(h, tag)
            test_agent(h, tag)
            test_controller(h, tag)
            test_rbac(h, tag)
            test_admission_policy(h, tag)
            test_custom_resources(h, tag)
            test_monitoring(h, tag)
            test_prometheus_rule(h, tag, work)
            test_dashboard(h, tag)
            test_uninstall_hook(h, tag)
            test_notes(h, tag, work)
        test_binary(binary, render(helm4))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"render_test: {passes} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
