"""Evaluates a ValidatingAdmissionPolicy against an AdmissionReview with cel-python, in the
apiserver's order (k8s.io/apiserver/pkg/admission/plugin/policy/validating):

  1. matchConstraints.resourceRules: operation, group, version and resource[/subresource]
     must match (namespaceSelector, objectSelector, excludeResourceRules: not used here);
  2. matchConditions in order: one false -> the policy does not apply; an error ->
     failurePolicy;
  3. variables in order (each sees the earlier ones as variables.<name>);
  4. validations: each must be true; false -> denied with its message or
     messageExpression; an error -> failurePolicy (Fail: denied, Ignore: skipped).

CEL activation: object, oldObject (null on CREATE), request (the AdmissionRequest without
object/oldObject), params (null), namespaceObject (null: the resources here are
cluster-scoped), variables. No `authorizer`.

Differences from the apiserver: no compile-time type check against the resource's schema
(a misspelt field fails only when evaluated), no cost limits, variables evaluated eagerly,
and only the CEL standard library, which is why the chart's policies stay in the subset
both implement (no optionals, no extension libraries, no two-variable comprehensions).
"""
from __future__ import annotations

from typing import Any

import celpy

_env = celpy.Environment()
_programs: dict[str, Any] = {}
TRUE = celpy.celtypes.BoolType(True)


def _eval(expr: str, activation: dict) -> Any:
    if expr not in _programs:
        _programs[expr] = _env.program(_env.compile(expr))
    return _programs[expr].evaluate(activation)


def _short(e: Exception) -> str:
    return str(e.args[0] if e.args else e).splitlines()[0][:160]


def _matches(rules: list[dict], req: dict) -> bool:
    def ok(values: list[str], v: str) -> bool:
        return "*" in values or v in values
    res = req.get("resource", {})
    resource = res.get("resource", "") + ("/" + req["subResource"] if req.get("subResource") else "")
    return any(ok(r.get("operations", []), req.get("operation", ""))
               and ok(r.get("apiGroups", []), res.get("group", ""))
               and ok(r.get("apiVersions", []), res.get("version", ""))
               and ok(r.get("resources", []), resource)
               for r in rules)


def _variables_map(values: dict) -> Any:
    return celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in values.items()})


def evaluate(policy: dict, review: dict) -> tuple[str, list[str]]:
    """Returns ("admitted" | "denied" | "not-applicable", messages)."""
    spec = policy["spec"]
    req = dict(review["request"])
    obj, old = req.pop("object", None), req.pop("oldObject", None)
    fail_closed = spec.get("failurePolicy", "Fail") == "Fail"

    if not _matches(spec.get("matchConstraints", {}).get("resourceRules", []), req):
        return "not-applicable", ["matchConstraints do not match"]

    act = {"object": celpy.json_to_cel(obj), "oldObject": celpy.json_to_cel(old),
           "request": celpy.json_to_cel(req), "params": celpy.json_to_cel(None),
           "namespaceObject": celpy.json_to_cel(None)}

    for cond in spec.get("matchConditions", []):
        try:
            hit = _eval(cond["expression"], act)
        except Exception as e:  # CELEvalError, CELParseError
            if fail_closed:
                return "denied", [f"matchCondition {cond['name']}: error {_short(e)} (failurePolicy Fail)"]
            return "admitted", [f"matchCondition {cond['name']}: error, failurePolicy Ignore"]
        if hit != TRUE:
            return "not-applicable", [f"matchCondition {cond['name']} is false"]

    variables: dict[str, Any] = {}
    for var in spec.get("variables", []):
        act["variables"] = _variables_map(variables)
        try:
            variables[var["name"]] = _eval(var["expression"], act)
        except Exception:
            pass  # lazily an error in the apiserver too: the validation using it fails
    act["variables"] = _variables_map(variables)

    denied: list[str] = []
    for i, v in enumerate(spec.get("validations", [])):
        try:
            ok = _eval(v["expression"], act)
        except Exception as e:
            if fail_closed:
                return "denied", [f"validations[{i}]: error {_short(e)} (failurePolicy Fail)"]
            continue
        if ok != TRUE:
            msg = v.get("message") or f"failed expression: {v['expression']}"
            if "messageExpression" in v:
                try:
                    msg = str(_eval(v["messageExpression"], act))
                except Exception:
                    pass  # the apiserver falls back to message as well
            denied.append(f"{v.get('reason', 'Invalid')}: {msg}")
    if denied:
        return "denied", denied
    return "admitted", ["all validations passed"]
