#!/usr/bin/env python3
"""The chart's monitoring against the real binary and a real Prometheus (needs root: the
self-test runs this machine's runc and crun).

1. Starts `usernsguard selftest --serve 127.0.0.1:PORT --interval 5s`, which serves the
   same /metrics, /healthz and /readyz as the agent, and checks that the paths the chart's
   probes use (read from the rendered DaemonSet and Deployment) answer 200 and /metrics
   is Prometheus text.
2. Starts Debian's Prometheus (own data dir, own loopback port) scraping it as job
   usernsguard-agent with honor_labels and a target label `node`, as the chart's
   ServiceMonitor does, with the chart's alert rules loaded; checks that the series keep
   their own `node` (no exported_node) and that every rule loads healthy.
3. Runs every PromQL query of files/dashboard.json (each panel target, and each template
   variable's label_values) with $node/$handler set to "All" and to one node and handler,
   and requires a non-empty, non-NaN result wherever the self-test produces the metrics the
   query reads. Where it does not (install state and CRI restarts: `selftest --serve`
   never installs), the reason is listed below and the query must still run.

Usage: live_test.py USERNSGUARD_BINARY RENDERED.yaml DASHBOARD.json ALERTS.yaml
Exit 0 when everything holds.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

# Metrics `selftest --serve` does not produce, and why; a query reading one may be empty.
NOT_FROM_SELFTEST = {
    "usernsguard_runtime_install_state":
        "install state exists only for RuntimeProfile installs, which selftest never does",
    "usernsguard_container_runtime_restarts_total":
        "CRI runtime restarts happen only on installs, which selftest never does",
}
# Metrics the dashboard's queries treat as 0 when absent (an agent older than the gauge):
# such a query must still return data.
ABSENT_AS_ZERO = {
    "usernsguard_selftest_check_warning":
        "pass/warn/fail queries read a missing warning gauge as 0",
}
# Panels that are empty by design when nothing is wrong: (precondition query, reason).
# When the precondition returns data, the panel must too.
EMPTY_WHEN_HEALTHY = {
    "Failing and warning checks": (
        "usernsguard_selftest_check_passed == 0 or usernsguard_selftest_check_warning == 1",
        "lists only checks that fail or warn"),
}
RATE_INTERVAL = "20s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Prom:
    def __init__(self, base: str):
        self.base = base

    def query(self, expr: str, path: str = "query", **params) -> dict:
        data = urllib.parse.urlencode({"query": expr, **params}).encode()
        try:
            with urllib.request.urlopen(f"{self.base}/api/v1/{path}", data=data, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.loads(e.read().decode() or "{}") or {"status": "error", "error": str(e)}

    def vector(self, expr: str) -> list:
        r = self.query(expr)
        return r["data"]["result"] if r.get("status") == "success" else []


def wait(what: str, check, timeout: float, procs: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, name, log in procs:
            if p.poll() is not None:
                raise SystemExit(f"FAIL {name} exited ({p.returncode}) while waiting for {what}:\n"
                                 + Path(log).read_text()[-2000:])
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"FAIL timed out after {timeout}s waiting for {what}")


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\busernsguard_[a-z_]+\b", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("usernsguard_selftest_duration_seconds") else n
            for n in names}


def substitute(expr: str, node: str, handler: str) -> str:
    return (expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$node", node).replace("$handler", handler))


def finite(sample_value: str) -> bool:
    v = float(sample_value)
    return not (math.isnan(v) or math.isinf(v))


def main() -> int:
    binary, rendered, dashboard_path, alerts = map(Path, sys.argv[1:5])
    bad = 0
    passed = 0

    def ok(msg):
        nonlocal passed
        passed += 1
        print(f"ok   {msg}")

    def fail(msg):
        nonlocal bad
        bad += 1
        print(f"FAIL {msg}")

    if os.geteuid() != 0:
        print("FAIL live_test.py needs root: `usernsguard selftest` runs runc and crun")
        return 1
    for tool in ("prometheus", "promtool"):
        if not shutil.which(tool):
            print(f"FAIL {tool} not on PATH (Debian package prometheus)")
            return 1

    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if isinstance(d, dict)]
    probes = set()
    for d in docs:
        if d["kind"] in ("DaemonSet", "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                for kind in ("livenessProbe", "readinessProbe"):
                    g = c[kind]["httpGet"]
                    probes.add((d["kind"], kind, g["path"], ports.get(g["port"], g["port"])))

    work = Path(tempfile.mkdtemp(prefix="ug-chart-live."))
    st_work = None
    procs = []
    try:
        st_port, prom_port = free_port(), free_port()
        st_log = work / "selftest.log"
        st_work = Path(f"/run/usernsguard-chart-live-{os.getpid()}")
        st = subprocess.Popen(
            [str(binary), "selftest", "--serve", f"127.0.0.1:{st_port}", "--interval", "5s",
             "--work-dir", str(st_work)],
            stdout=open(st_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((st, "usernsguard selftest --serve", st_log))
        base = f"http://127.0.0.1:{st_port}"
        wait("selftest --serve /metrics with self-test results",
             lambda: "usernsguard_selftest_last_run_timestamp_seconds{" in (
                 http_get(base + "/metrics")[1] if _listening(st_port) else ""), 60, procs)

        # 1. The chart's probe paths are what the binary serves.
        for kind, probe, path, port in sorted(probes):
            status, _ = http_get(base + path)
            if status == 200:
                ok(f"{kind} {probe} GET {path} (port {port}) -> 200 from the binary")
            else:
                fail(f"{kind} {probe} GET {path} -> {status} from the binary")
        status, text = http_get(base + "/metrics")
        if status == 200 and "# TYPE usernsguard_build_info gauge" in text:
            ok("GET /metrics -> 200, Prometheus text with usernsguard_build_info")
        else:
            fail(f"GET /metrics -> {status}")
        node = re.search(r'usernsguard_node_info\{[^}]*node="([^"]+)"', text)
        node = node.group(1) if node else ""

        # 2. Prometheus scraping it like the chart's ServiceMonitor, with the alert rules.
        shutil.copy(alerts, work / "alerts.yaml")
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yaml"],
            "scrape_configs": [{
                "job_name": "usernsguard-agent",
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{st_port}"],
                                    # what the ServiceMonitor's relabeling adds: the pod's node
                                    "labels": {"node": "target-node-label"}}],
            }],
        }))
        subprocess.run(["promtool", "check", "config", str(work / "prometheus.yml")],
                       check=True, capture_output=True)
        prom_log = work / "prometheus.log"
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=open(prom_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((prom, "prometheus", prom_log))
        p = Prom(f"http://127.0.0.1:{prom_port}")
        wait("Prometheus ready", lambda: _listening(prom_port) and
             http_get(f"http://127.0.0.1:{prom_port}/-/ready")[0] == 200, 30, procs)
        # Two self-test runs inside the scraped data, so that increase() over the
        # duration histogram sees one.
        wait("two scraped self-test runs", lambda: bool(p.vector(
            f"increase(usernsguard_selftest_duration_seconds_count[{RATE_INTERVAL}]) > 0")), 60, procs)

        present = {s["metric"]["__name__"] for s in p.vector('count by (__name__) ({__name__=~"usernsguard_.+"})')}
        present = {re.sub(r"_(bucket|sum|count)$", "", n) for n in present}
        if p.vector('{__name__=~"usernsguard_.+", exported_node!=""}'):
            fail("scraped series have exported_node: the target label renamed their own node label")
        else:
            ok("with honor_labels every usernsguard series keeps its own node label (no exported_node)")
        up = p.vector('up{job="usernsguard-agent"}')
        if up and up[0]["metric"].get("node") == "target-node-label":
            ok("up{job=\"usernsguard-agent\"} carries the target's node label (for UsernsguardAgentDown)")
        else:
            fail(f"up{{job=\"usernsguard-agent\"}} without the target node label: {up}")
        own = {s["metric"].get("node") for s in p.vector("usernsguard_node_info")}
        if own == {node} and node:
            ok(f"usernsguard_node_info has the binary's own node label {node!r}")
        else:
            fail(f"usernsguard_node_info node labels {own}, expected {{{node!r}}}")

        with urllib.request.urlopen(f"{p.base}/api/v1/rules", timeout=10) as r:
            groups = json.load(r)["data"]["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        unhealthy = [f"{r.get('name')}: {r.get('lastError')}" for r in rules if r.get("health") != "ok"]
        wanted = {r.get("alert") or r.get("record") for g in yaml.safe_load(alerts.read_text())["groups"]
                  for r in g["rules"]}
        loaded = {r["name"] for r in rules}
        if unhealthy or loaded != wanted:
            fail(f"alert rules in Prometheus: unhealthy {unhealthy}, missing {wanted - loaded}")
        else:
            ok(f"{len(rules)} rules of {alerts.name} loaded and evaluated healthy in Prometheus")

        # 3. Every dashboard query.
        dash = json.loads(dashboard_path.read_text())
        handler = "runc"
        queries = []
        for v in dash["templating"]["list"]:
            if v["type"] == "query":
                m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"].strip())
                if not m:
                    fail(f"variable {v['name']}: not label_values(metric, label): {v['query']['query']}")
                    continue
                queries.append((f"variable ${v['name']}", f"group by ({m[2]}) ({m[1]})", True))
        for panel in dash["panels"]:
            if panel["type"] == "row":
                continue
            if not panel.get("targets"):
                fail(f"panel {panel['title']!r} has no query")
            for t in panel.get("targets", []):
                if t.get("datasource", {}).get("uid") != "${datasource}":
                    fail(f"panel {panel['title']!r} {t['refId']}: datasource is not ${{datasource}}")
                queries.append((f"panel {panel['title']!r} {t['refId']}", t["expr"], True))
        for what, expr, _ in queries:
            names = metric_names(expr)
            missing = names - present
            allowed_empty = None
            if missing - set(NOT_FROM_SELFTEST) - set(ABSENT_AS_ZERO):
                fail(f"{what}: reads {sorted(missing)}, which the binary does not export "
                     f"and no reason here explains")
                continue
            if missing & set(NOT_FROM_SELFTEST):
                allowed_empty = "; ".join(NOT_FROM_SELFTEST[n] for n in sorted(missing & set(NOT_FROM_SELFTEST)))
            title = re.match(r"panel '(.*)' \w+$", what)
            if title and title[1] in EMPTY_WHEN_HEALTHY:
                pre, reason = EMPTY_WHEN_HEALTHY[title[1]]
                if not p.vector(pre):
                    allowed_empty = reason
            for label, (n, h) in (("All", (".*", ".*")), (f"node={node},handler={handler}", (node, handler))):
                e = substitute(expr, n, h)
                r = p.query(e)
                if r.get("status") != "success":
                    fail(f"{what} [{label}]: query error: {r.get('error')}\n       {e}")
                    continue
                res = r["data"]["result"]
                values = [s["value"][1] for s in res] if isinstance(res, list) else [res[1]]
                rng = p.query(e, "query_range", start=time.time() - 20, end=time.time(), step="2")
                if rng.get("status") != "success":
                    fail(f"{what} [{label}]: range query error: {rng.get('error')}")
                    continue
                if allowed_empty is not None:
                    ok(f"{what} [{label}]: runs; {len(values)} series, empty allowed: {allowed_empty}")
                elif not values:
                    fail(f"{what} [{label}]: empty\n       {e}")
                elif not all(finite(v) for v in values):
                    fail(f"{what} [{label}]: NaN/Inf in {values}\n       {e}")
                else:
                    ok(f"{what} [{label}]: {len(values)} series, e.g. {values[0]}")
    finally:
        for proc, _, _ in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if bad:
            for _, name, log in procs:
                print(f"--- {name} log (tail)\n{Path(log).read_text()[-1500:]}")
        shutil.rmtree(work, ignore_errors=True)
        # The self-test empties its work dir after every run; never rmtree it (a probe's
        # leftover bind mount would lead into the host's directories).
        if st_work is not None and st_work.exists():
            try:
                st_work.rmdir()
            except OSError as e:
                print(f"WARN {st_work} left behind: {e}")
    print(f"live_test: {passed} passed, {bad} failed")
    return 1 if bad else 0


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    sys.exit(main())
