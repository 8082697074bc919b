#!/usr/bin/env python3
"""Strict offline validation of rendered chart manifests (`helm template` output) for
several Kubernetes versions, closing the gap of the `kubernetes-validate` CLI, which only
WARNs and exits 0 on a kind it has no schema for (so a custom resource with a typo, or a v1
ValidatingAdmissionPolicy rendered for a version without it, would pass silently).

Every object must be accounted for:
  * built-in kinds: kubernetes_validate.validate(obj, version, strict=True) for each -k;
  * kinds served by a CRD in the same stream (the chart's own CRDs): the apiserver's view as
    tests/validate_crds.py implements it: each CRD passes its structural checks, and each
    object is checked with unknown fields refused, defaults applied, the openAPIV3Schema
    and every x-kubernetes-validations CEL rule;
  * groups given with --skip (monitoring.coreos.com: tests/chart/monitoring checks those
    against the prometheus-operator schemas): reported as skipped, and must be present
    when --expect-skipped says so;
  * anything else: FAIL.

Usage: validate_manifests.py [-k 1.30 ...] [--skip GROUP] [VERSION=]FILE...
  A FILE is checked for every -k; VERSION=FILE for that version only (one process for
  many renders: loading the schemas is the slow part).    Exit 0 when all pass.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import celpy
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import validate_crds  # noqa: E402  (tests/validate_crds.py: the CRD and custom-resource rules)


class StrictLoader(yaml.SafeLoader):
    """Refuses a mapping with a duplicated key, as the API server's strict decoding does
    (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicated key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=StrictLoader) if isinstance(d, dict)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", "--kubernetes-version", action="append", default=[])
    p.add_argument("--skip", action="append", default=[],
                   help="API group checked elsewhere, reported as skipped")
    p.add_argument("--expect-skipped", type=int, default=None,
                   help="fail unless exactly this many objects of each file were skipped")
    p.add_argument("files", nargs="+")
    a = p.parse_args()

    env = celpy.Environment()
    report = validate_crds.Report()
    passed = failed = skipped = 0
    for arg in a.files:
        version, sep, path = arg.partition("=")
        f, versions = (Path(path), [version]) if sep else (Path(arg), a.kubernetes_version)
        if not versions:
            p.error(f"{arg}: no Kubernetes version (-k or VERSION=FILE)")
        file_skipped = 0
        try:
            objs = load(f)
        except yaml.YAMLError as e:
            failed += 1
            print(f"FAIL {f}: {e}")
            continue
        crds: dict[tuple[str, str], tuple[dict, dict]] = {}
        for obj in objs:
            if obj.get("kind") == "CustomResourceDefinition":
                if not validate_crds.check_crd(f, obj, env, report):
                    failed += 1
                    continue
                for v in obj["spec"]["versions"]:
                    key = (f"{obj['spec']['group']}/{v['name']}", obj["spec"]["names"]["kind"])
                    crds[key] = (obj, v["schema"]["openAPIV3Schema"])
        for obj in objs:
            kind, api = obj.get("kind", "?"), obj.get("apiVersion", "?")
            group = api.rsplit("/", 1)[0] if "/" in api else ""
            name = f"{f.name}: {kind}/{obj.get('metadata', {}).get('name', '?')}"
            if group in a.skip:
                print(f"skip {name} ({api}: checked elsewhere)")
                skipped += 1
                file_skipped += 1
                continue
            if (api, kind) in crds:
                errs = validate_crds.object_errors(obj, crds, env, set())
                if errs:
                    failed += 1
                    print(f"FAIL {name} (CRD schema and CEL): " + "; ".join(errs))
                else:
                    passed += 1
                    print(f"ok   {name} (CRD schema and CEL)")
                continue
            for ver in versions:
                try:
                    used = kubernetes_validate.validate(obj, ver, strict=True)
                    passed += 1
                    print(f"ok   {name} @{ver} (schema {used})")
                except kubernetes_validate.ValidationError as e:
                    failed += 1
                    print(f"FAIL {name} @{ver}: {'.'.join(map(str, e.path))}: {e.message}")
                except SchemaNotFoundError as e:
                    failed += 1
                    print(f"FAIL {name} @{ver}: no schema: {e.message}")
        if a.expect_skipped is not None and file_skipped != a.expect_skipped:
            failed += 1
            print(f"FAIL {f}: expected {a.expect_skipped} skipped objects, got {file_skipped}")
    failed += len(report.failures)
    print(f"validate_manifests: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
