#!/usr/bin/env python3
"""Type-checks a Grafana dashboard JSON against npm @grafana/schema with `tsc --strict`,
without a Grafana server, and proves the check is not vacuous.

Each JSON becomes `export const dashboard = <json> satisfies CheckedDashboard;`
(check/panels.ts): the Dashboard type with each panel's `options` and
`fieldConfig.defaults.custom` typed by its panel type, and Prometheus targets. An inline
literal with `satisfies` keeps literal types and rejects unknown keys, which neither a
type annotation nor importing the JSON would (string enums cannot be spelled in JSON:
check/jsonish.ts maps them to their string values).

The dashboard must type-check; each mutation below (a mistake a reviewer would want
caught) must not. All files go through one tsc run.

Usage: typecheck.py NPM_PROJECT_DIR DASHBOARD.json     exit 0 when all expectations hold.
NPM_PROJECT_DIR: `npm ci` of package.json/package-lock.json beside this script.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def first(d: dict, panel_type: str) -> dict:
    return next(p for p in d["panels"] if p["type"] == panel_type)


MUTATIONS = {
    "top-level key typo": lambda d: d.__setitem__("refresch", "1m"),
    "threshold mode typo": lambda d: first(d, "timeseries")["fieldConfig"]["defaults"]["thresholds"].__setitem__("mode", "absolut"),
    "legend key typo": lambda d: first(d, "timeseries")["options"]["legend"].__setitem__("placment", "bottom"),
    "legend display mode unknown": lambda d: first(d, "timeseries")["options"]["legend"].__setitem__("displayMode", "grid"),
    "stat without textMode": lambda d: first(d, "stat")["options"].pop("textMode"),
    "gridPos.h as a string": lambda d: first(d, "timeseries")["gridPos"].__setitem__("h", "8"),
    "target without expr": lambda d: first(d, "timeseries")["targets"][0].pop("expr"),
    "draw style unknown": lambda d: first(d, "timeseries")["fieldConfig"]["defaults"]["custom"].__setitem__("drawStyle", "dots"),
    "panel type unknown": lambda d: first(d, "timeseries").__setitem__("type", "graph"),
    "variable hide 7": lambda d: d["templating"]["list"][0].__setitem__("hide", 7),
    "table cell type unknown": lambda d: first(d, "table")["fieldConfig"]["defaults"]["custom"].__setitem__("cellOptions", {"type": "sparkles"}),
}


def main() -> int:
    project, dashboard = Path(sys.argv[1]), Path(sys.argv[2])
    base = json.loads(dashboard.read_text())
    cases = [("the dashboard", base, True)] + [
        (name, (lambda d: (change(d), d)[1])(copy.deepcopy(base)), False)
        for name, change in MUTATIONS.items()]
    # Inside the project, so that node_modules resolves.
    work = Path(tempfile.mkdtemp(prefix="typecheck.", dir=project))
    try:
        (work / "check").mkdir()
        for ts in ("jsonish.ts", "panels.ts"):
            shutil.copy(HERE / "check" / ts, work / "check" / ts)
        shutil.copy(HERE / "tsconfig.json", work / "tsconfig.json")
        for i, (name, doc, _) in enumerate(cases):
            text = json.dumps(doc, indent=2) if i else dashboard.read_text().rstrip()
            (work / "check" / f"case{i}.ts").write_text(
                f"// {name}\nimport type {{ CheckedDashboard }} from './panels.js';\n"
                f"export const dashboard = {text} satisfies CheckedDashboard;\n")
        out = subprocess.run([str(project / "node_modules" / ".bin" / "tsc"), "-p", ".", "--pretty", "false"],
                             cwd=work, capture_output=True, text=True)
        errors: dict[int, list[str]] = {}
        other = []
        for line in (out.stdout + out.stderr).splitlines():
            m = re.match(r"check/case(\d+)\.ts\((\d+),(\d+)\): (.*)", line)
            if m:
                # The JSON's own line numbers: two header lines come first.
                errors.setdefault(int(m[1]), []).append(f"line {int(m[2]) - 2}: {m[4]}")
            elif line.strip() and not line.startswith(" "):
                other.append(line)
        bad = 0
        if other:
            print("FAIL tsc reported errors outside the cases:\n  " + "\n  ".join(other))
            bad += 1
        for i, (name, _, want_ok) in enumerate(cases):
            errs = errors.get(i, [])
            if want_ok and errs:
                bad += 1
                print(f"FAIL {name} ({dashboard}) does not type-check:\n  " + "\n  ".join(errs))
            elif not want_ok and not errs:
                bad += 1
                print(f"FAIL mutation '{name}' type-checks: the check is blind to it")
            else:
                print(f"ok   {name}: " + ("type-checks" if want_ok else f"rejected ({errs[0][:110]})"))
        print(f"typecheck: {len(cases) - bad} passed, {bad} failed")
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
