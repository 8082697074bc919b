#!/usr/bin/env python3
"""Offline validation of the generated CRDs and the example custom resources.

No apiserver is available to CI, so this does what `kubectl apply` against one would:

1. Every `crds/*.yaml` must be a valid apiextensions.k8s.io/v1 CustomResourceDefinition
   (PyPI `kubernetes-validate`, strict mode, against the Kubernetes version below), and its
   schemas must satisfy the apiserver's rules for CRD schemas that the generic OpenAPI check
   does not see: structural schema, list-type/map-key constraints, defaults that validate
   against their own schema, CEL rules that parse and only name fields that exist, printer
   columns that point at existing fields.
2. Every `examples/*.yaml` must be accepted: unknown fields refused (kubectl's strict field
   validation), schema defaults applied, the OpenAPI schema checked with `jsonschema`, and
   each `x-kubernetes-validations` CEL rule evaluated with `cel-python` at its place in the
   object, as the apiserver does on create.
   Each is also re-applied unchanged as an update, which every transition rule (those
   using `oldSelf`) must accept.
3. Every `examples/invalid/*.yaml` must be rejected, and for the reason its
   `# expect-error: <text>` header names, so a broken example cannot pass by failing
   somewhere else. A file with two documents is an update: the first is the stored
   object (which must be valid), the second the new one, and transition rules run with
   `oldSelf` correlated as the apiserver does (field names, map keys, list-map keys).

Not reproduced: the apiserver's CEL cost estimation, and CEL functions beyond the CEL
standard library (Kubernetes' extension libraries); the rules here use neither.

Exit status 0 when everything holds, 1 otherwise. Run from anywhere:
    python3 tests/validate_crds.py
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import celpy
import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"

# Formats the apiserver's CRD validation knows (k8s.io/apiextensions-apiserver
# pkg/apiserver/validation/formats.go); others are accepted with a warning only.
KNOWN_FORMATS = {
    "bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid",
    "uuid3", "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor",
    "rgbcolor", "byte", "password", "date", "duration", "datetime", "date-time", "int32",
    "int64", "float", "double",
}
SCALAR_TYPES = {"string", "integer", "number", "boolean"}
# Keywords a structural schema must not use (apiextensions v1 validation).
FORBIDDEN_KEYS = {"$ref", "definitions", "id", "$schema", "additionalItems",
                  "patternProperties", "dependencies"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# `self.a.b` chains in a CEL rule; checked against the schema like the apiserver's type check.
SELF_PATH = re.compile(r"\b(self|oldSelf)((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.warnings: list[str] = []

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"FAIL {msg}")

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"WARN {msg}")

    def ok(self, msg: str) -> None:
        print(f"ok   {msg}")


def load_docs(path: Path) -> list[dict]:
    try:
        with path.open() as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        sys.exit(f"FAIL {path}: cannot read YAML: {e}")
    for d in docs:
        if not isinstance(d, dict):
            sys.exit(f"FAIL {path}: expected a mapping per YAML document, got {type(d).__name__}")
    return docs


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return key if path in ("", "<root>") else f"{path}.{key}"


def schema_nodes(schema: dict, path: str = "<root>") -> Iterator[tuple[str, dict]]:
    """Every subschema with a readable path (`spec.checks[]`, `spec.overhead{}`)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from schema_nodes(sub, join(path, name))
    if isinstance(schema.get("items"), dict):
        yield from schema_nodes(schema["items"], path + "[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from schema_nodes(schema["additionalProperties"], path + "{}")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            yield from schema_nodes(sub, f"{path}({key}[{i}])")
    if isinstance(schema.get("not"), dict):
        yield from schema_nodes(schema["not"], f"{path}(not)")


def to_jsonschema(schema: Any) -> Any:
    """OpenAPI v3 `nullable` as JSON Schema: `type: [t, "null"]`."""
    if isinstance(schema, list):
        return [to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: to_jsonschema(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-")}
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    return out


def validator_for(schema: dict) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(to_jsonschema(schema))


def cel_program(env: celpy.Environment, rule: str):
    return env.program(env.compile(rule))


def resolve_self_path(schema: dict, fields: list[str], at_root: bool) -> str | None:
    """None if `self.<fields>` exists in the schema, else the first missing field."""
    node = schema
    for i, field in enumerate(fields):
        if at_root and i == 0 and field == "metadata":
            # The apiserver exposes only metadata.name and metadata.generateName to root rules.
            if len(fields) > 1 and fields[1] not in ("name", "generateName"):
                return "metadata." + fields[1]
            return None
        if node.get("type") == "object" and field in node.get("properties", {}):
            node = node["properties"][field]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("x-kubernetes-preserve-unknown-fields"):
            return None
        else:
            return field
        if node.get("type") != "object" and i + 1 < len(fields):
            # e.g. self.list.size(): methods on scalars/lists are not fields
            return None
    return None


def check_crd(path: Path, crd: dict, env: celpy.Environment, report: Report) -> bool:
    """False when the CRD is not even a well-formed CRD object (then nothing else is checked)."""
    name = crd.get("metadata", {}).get("name", "?")
    where = f"{path.name} ({name})"
    try:
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        report.fail(f"{where}: not a valid apiextensions.k8s.io/v1 CRD for Kubernetes "
                    f"{KUBERNETES_VERSION}: {e.message} at {'/'.join(map(str, e.path))}")
        return False

    spec = crd["spec"]
    errors: list[str] = []
    if spec["scope"] != "Cluster":
        errors.append(f"scope is {spec['scope']}, DESIGN.md says every kind is cluster-scoped")
    if not spec["names"].get("shortNames"):
        errors.append("no short name")
    if sum(1 for v in spec["versions"] if v.get("storage")) != 1:
        errors.append("exactly one version must be the storage version")

    for version in spec["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        if "status" in schema.get("properties", {}) and "status" not in version.get("subresources", {}):
            errors.append(f"{version['name']}: has .status but no status subresource")
        errors += [f"{version['name']}: {e}" for e in structural_errors(schema, env, report, where)]
        for col in version.get("additionalPrinterColumns", []):
            fields = re.sub(r"\[\?\(.*?\)\]", "", col["jsonPath"]).lstrip(".").split(".")
            if fields[0] == "metadata":
                continue
            missing = resolve_self_path(schema, fields, at_root=False)
            if missing:
                errors.append(f"printer column {col['name']!r}: {col['jsonPath']} names "
                              f"no field of the schema ({missing!r})")

    for e in errors:
        report.fail(f"{where}: {e}")
    if not errors:
        report.ok(f"{where}: valid apiextensions.k8s.io/v1 CRD, structural schema, "
                  f"CEL rules compile")
    return True


def structural_errors(root: dict, env: celpy.Environment, report: Report, where: str) -> list[str]:
    errors = []
    for path, node in schema_nodes(root):
        in_junctor = "(" in path
        for key in FORBIDDEN_KEYS & node.keys():
            errors.append(f"{path}: {key} is not allowed in a structural schema")
        if in_junctor:
            for key in ("type", "description", "default", "nullable", "additionalProperties"):
                if key in node:
                    errors.append(f"{path}: {key} is not allowed inside anyOf/oneOf/allOf/not")
            continue
        if "type" not in node and not (node.get("x-kubernetes-int-or-string")
                                       or node.get("x-kubernetes-preserve-unknown-fields")):
            errors.append(f"{path}: every schema node needs a type")
        if node.get("uniqueItems") is True:
            errors.append(f"{path}: uniqueItems: true is not allowed")
        if node.get("additionalProperties") is False:
            errors.append(f"{path}: additionalProperties: false is not allowed")
        if "additionalProperties" in node and "properties" in node:
            errors.append(f"{path}: properties and additionalProperties are mutually exclusive")
        if node.get("x-kubernetes-preserve-unknown-fields") is False:
            errors.append(f"{path}: x-kubernetes-preserve-unknown-fields: false is not allowed")
        if "items" in node and not isinstance(node["items"], dict):
            errors.append(f"{path}: items must be a single schema")
        if node.get("type") == "array" and "items" not in node:
            errors.append(f"{path}: arrays need items")
        if "format" in node and node["format"] not in KNOWN_FORMATS:
            report.warn(f"{where}: {path}: format {node['format']!r} is unknown to the "
                        f"apiserver (accepted, not enforced)")
        if path == "<root>":
            meta = node.get("properties", {}).get("metadata", {})
            extra = set(meta.get("properties", {})) - {"name", "generateName"}
            if extra:
                errors.append(f"metadata: only name and generateName may be constrained, not {sorted(extra)}")

        list_type = node.get("x-kubernetes-list-type")
        items = node.get("items", {}) if isinstance(node.get("items"), dict) else {}
        if list_type == "set" and items.get("type") not in SCALAR_TYPES:
            errors.append(f"{path}: x-kubernetes-list-type set needs scalar items")
        if list_type == "map":
            if items.get("type") != "object":
                errors.append(f"{path}: x-kubernetes-list-type map needs object items")
            keys = node.get("x-kubernetes-list-map-keys") or []
            if not keys:
                errors.append(f"{path}: x-kubernetes-list-type map needs x-kubernetes-list-map-keys")
            for key in keys:
                prop = items.get("properties", {}).get(key)
                if prop is None:
                    errors.append(f"{path}: list map key {key!r} is not a property of the items")
                elif key not in items.get("required", []) and "default" not in prop:
                    errors.append(f"{path}: list map key {key!r} must be required or defaulted")
                elif prop.get("type") not in SCALAR_TYPES:
                    errors.append(f"{path}: list map key {key!r} must be a scalar")
        elif "x-kubernetes-list-map-keys" in node:
            errors.append(f"{path}: x-kubernetes-list-map-keys without list-type map")

        if "default" in node:
            default = node["default"]
            for e in validator_for(node).iter_errors(default):
                errors.append(f"{path}: default {default!r} does not validate: {e.message}")
            errors += [f"{path}: default: {e}" for e in unknown_fields(node, default, path)]

        for rule in node.get("x-kubernetes-validations", []):
            text = rule["rule"]
            try:
                cel_program(env, text)
            except Exception as e:  # celpy raises several parse error types
                errors.append(f"{path}: CEL rule {text!r} does not parse: {e}")
                continue
            if "\n" in rule.get("message", ""):
                errors.append(f"{path}: CEL message must be one line")
            for var, fields in self_paths(text):
                missing = resolve_self_path(node, fields, at_root=path == "<root>")
                if missing:
                    errors.append(f"{path}: CEL rule {text!r} names {var}.{'.'.join(fields)}, "
                                  f"which has no field {missing!r} in the schema")
            if "fieldPath" in rule:
                fields = rule["fieldPath"].lstrip(".").split(".")
                if resolve_self_path(node, fields, at_root=False):
                    errors.append(f"{path}: fieldPath {rule['fieldPath']} is not in the schema")
    return errors


def unknown_fields(schema: dict, value: Any, path: str) -> Iterator[str]:
    """Fields the schema does not declare, as kubectl's strict field validation reports them."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                yield from unknown_fields(props[key], sub, join(path, key))
            elif isinstance(extra, dict):
                yield from unknown_fields(extra, sub, join(path, key))
            elif extra is not True:
                yield f"{path}: unknown field {key!r}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from unknown_fields(schema["items"], sub, join(path, i))


def apply_defaults(schema: dict, value: Any) -> Any:
    """The apiserver's structural defaulting: absent fields get their schema default."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in schema.get("properties", {}):
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


ABSENT = object()  # no old value at this place: transition rules are not evaluated


def cel_errors(env: celpy.Environment, schema: dict, value: Any, old: Any, path: str,
               covered: set[tuple[str, str]]) -> Iterator[str]:
    """Evaluate each rule where its schema node applies to the value.

    `old` is the stored object's value at the same place on update (correlated by field
    name, map key and list-map keys, as the apiserver does), or ABSENT: then rules using
    `oldSelf` are skipped, like on create.
    """
    for rule in schema.get("x-kubernetes-validations", []):
        text = rule["rule"]
        activation = {"self": celpy.json_to_cel(value)}
        if is_transition_rule(text):
            if old is ABSENT:
                continue
            activation["oldSelf"] = celpy.json_to_cel(old)
        where = path
        if "fieldPath" in rule:
            where = join(path, rule["fieldPath"].lstrip("."))
        try:
            result = cel_program(env, text).evaluate(activation)
        except Exception as e:  # evaluation errors reject the object, as on the apiserver
            covered.add((path_pattern(path), text))
            yield f"{where}: CEL rule {text!r} failed to evaluate: {short(e)}"
            continue
        if result != celpy.celtypes.BoolType(True):
            covered.add((path_pattern(path), text))
            yield f"{where}: {rule.get('message', 'failed rule: ' + text)} (rule: {text})"
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            sub_schema = props.get(key, extra if isinstance(extra, dict) else None)
            old_sub = old.get(key, ABSENT) if isinstance(old, dict) else ABSENT
            if sub_schema is not None:
                yield from cel_errors(env, sub_schema, sub, old_sub, join(path, key), covered)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys") or []
        old_items = {}
        if schema.get("x-kubernetes-list-type") == "map" and isinstance(old, list):
            old_items = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)}
        for i, sub in enumerate(value):
            old_sub = ABSENT
            if old_items and isinstance(sub, dict):
                old_sub = old_items.get(tuple(sub.get(k) for k in keys), ABSENT)
            yield from cel_errors(env, schema["items"], sub, old_sub, join(path, i), covered)


def is_transition_rule(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


def self_paths(rule: str) -> Iterator[tuple[str, list[str]]]:
    """`self.a.b` field chains in a rule, without a trailing method call (`self.a.size()`)."""
    for m in SELF_PATH.finditer(rule):
        fields = [f for f in m.group(2).split(".") if f]
        if rule[m.end():].lstrip().startswith("("):
            fields = fields[:-1]
        if fields:
            yield m.group(1), fields


def short(e: Exception) -> str:
    """celpy wraps the cause in a tuple whose repr includes the whole activation."""
    cause = e.args[2] if len(e.args) > 2 else e.args
    return f"{type(e).__name__}: {cause!s:.200}"


def path_pattern(path: str) -> str:
    return re.sub(r"\[\d+\]", "[]", path)


def object_errors(obj: dict, crds: dict, env: celpy.Environment,
                  covered: set[tuple[str, str]], old: dict | None = None) -> list[str]:
    """Why the apiserver would refuse `obj`: on create, or on update of `old` if given."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    found = crds.get((api_version, kind))
    if found is None:
        return [f"<root>: no CRD in crds/ serves {kind} {api_version}"]
    crd, schema = found
    errors = []
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(f"metadata.name: {name!r} is not a DNS subdomain")
    if crd["spec"]["scope"] == "Cluster" and "namespace" in meta:
        errors.append("metadata.namespace: not allowed on a cluster-scoped kind")

    errors += list(unknown_fields(schema, strip_meta(obj), "<root>"))
    body = defaulted_body(schema, obj)
    for e in sorted(validator_for(schema).iter_errors(body), key=lambda e: list(e.absolute_path)):
        where = "<root>"
        for part in e.absolute_path:
            where = join(where, part)
        errors.append(f"{where}: {e.message}")
    old_view = ABSENT if old is None else cel_view(old, defaulted_body(schema, old))
    errors += list(cel_errors(env, schema, cel_view(obj, body), old_view, "<root>", covered))
    return errors


def strip_meta(obj: dict) -> dict:
    """The part of an object the CRD schema describes (metadata is validated separately)."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}


def defaulted_body(schema: dict, obj: dict) -> dict:
    return apply_defaults(schema, copy.deepcopy(strip_meta(obj)))


def cel_view(obj: dict, body: dict) -> dict:
    """What root-level rules see: the defaulted body plus metadata.name/generateName only."""
    meta = obj.get("metadata") or {}
    return dict(body, apiVersion=obj.get("apiVersion"), kind=obj.get("kind"),
                metadata={k: meta[k] for k in ("name", "generateName") if k in meta})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root holding crds/ and examples/")
    args = parser.parse_args()
    report = Report()
    env = celpy.Environment()

    crd_files = sorted((args.root / "crds").glob("*.yaml"))
    if not crd_files:
        report.fail(f"no CRDs under {args.root / 'crds'}")
    crds: dict[tuple[str, str], tuple[dict, dict]] = {}
    for path in crd_files:
        for crd in load_docs(path):
            if not check_crd(path, crd, env, report):
                continue
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                crds[key] = (crd, version["schema"]["openAPIV3Schema"])

    covered: set[tuple[str, str]] = set()
    valid = sorted((args.root / "examples").glob("*.yaml"))
    invalid = sorted((args.root / "examples" / "invalid").glob("*.yaml"))
    if not valid or not invalid:
        report.fail("examples/*.yaml and examples/invalid/*.yaml must both exist")

    for path in valid:
        for obj in load_docs(path):
            # Create, then re-apply unchanged: transition rules must accept a no-op update.
            errors = object_errors(obj, crds, env, set())
            errors += [f"(unchanged update) {e}" for e in object_errors(obj, crds, env, set(), old=obj)]
            rel = path.relative_to(args.root)
            if errors:
                report.fail(f"{rel}: valid example rejected:\n       " + "\n       ".join(errors))
            else:
                report.ok(f"{rel}: accepted")

    for path in invalid:
        rel = path.relative_to(args.root)
        expect = re.search(r"^# expect-error: (.+)$", path.read_text(), re.M)
        if not expect:
            report.fail(f"{rel}: needs a '# expect-error: <text>' header")
            continue
        expected = expect.group(1).strip()
        docs = load_docs(path)
        if len(docs) == 2:
            # An update: the first document is the stored object and must itself be valid.
            stored, obj = docs
            stored_errors = object_errors(stored, crds, env, set())
            if stored_errors:
                report.fail(f"{rel}: the stored object (first document) is itself invalid:\n       "
                            + "\n       ".join(stored_errors))
                continue
            errors = object_errors(obj, crds, env, covered, old=stored)
        elif len(docs) == 1:
            errors = object_errors(docs[0], crds, env, covered)
        else:
            report.fail(f"{rel}: expected one object (create) or two (stored, update)")
            continue
        if not errors:
            report.fail(f"{rel}: invalid example accepted (expected: {expected})")
        elif not any(expected in e for e in errors):
            report.fail(f"{rel}: rejected, but not with {expected!r}:\n       "
                        + "\n       ".join(errors))
        else:
            report.ok(f"{rel}: rejected: {next(e for e in errors if expected in e)}")

    # Every CEL rule must be shown to bite by some invalid example, so a rule that can never
    # fail (a typo, a wrong field) does not go unnoticed.
    for (crd, schema) in {id(c): (c, s) for c, s in crds.values()}.values():
        for path, node in schema_nodes(schema):
            for rule in node.get("x-kubernetes-validations", []):
                if (path, rule["rule"]) not in covered:
                    report.fail(f"{crd['spec']['names']['kind']} {path}: no invalid example "
                                f"violates CEL rule {rule['rule']!r}")

    print(f"\n{len(report.failures)} failure(s), {len(report.warnings)} warning(s)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
