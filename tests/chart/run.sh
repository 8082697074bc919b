#!/usr/bin/env bash
# The Helm chart's tests: charts/usernsguard with Helm 3 and Helm 4, its manifests
# validated for Kubernetes 1.30..1.35, the values schema, the admission policy's CEL, the
# alert rules (promtool), the dashboard (tsc against @grafana/schema), what the chart
# renders object by object, and the dashboard's queries and the probe paths against the
# real binary scraped by a real Prometheus.
#
# Usage: tests/chart/run.sh [USERNSGUARD_BINARY]     (default: target/release/usernsguard)
# Needs root for the last step (the self-test runs runc and crun). Installs and caches its
# tools itself (tests/chart/lib/tools.sh; USERNSGUARD_CACHE, default ~/.cache/usernsguard)
# and fails loudly when one is missing. Prints each step's wall time.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
chart="$root/charts/usernsguard"
binary="${1:-$root/target/release/usernsguard}"
[[ -x "$binary" ]] || { echo "tests/chart: no usernsguard binary at $binary (pass its path)" >&2; exit 2; }
binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"

# shellcheck source=lib/tools.sh
source "$here/lib/tools.sh"

out="$(mktemp -d /tmp/ug-chart-test.XXXXXX)"
trap 'rm -rf "$out"' EXIT
steps=0
t_all=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
step() { # name command...
  local name="$1" t0 rc=0
  shift
  t0=$EPOCHREALTIME
  printf '\n--- %s\n' "$name"
  "$@" || rc=$?
  printf -- '--- %s: %s (%ss)\n' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAILED, exit $rc")" "$(since "$t0")"
  if [[ $rc != 0 ]]; then
    echo "chart: $steps passed, 1 failed"
    exit 1
  fi
  steps=$((steps + 1))
}

step "tools (helm 3.18.0 and 4.1.4, venv, npm projects, promtool)" ensure_tools
echo "helm: $("$HELM3" version --template '{{.Version}}') $("$HELM4" version --template '{{.Version}}'); venv: $VENV"

value_sets=(default ci/all-values.yaml ci/podmonitor-values.yaml)
kube_versions=(1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0)
monitoring_api=(-a monitoring.coreos.com/v1/ServiceMonitor -a monitoring.coreos.com/v1/PodMonitor
                -a monitoring.coreos.com/v1/PrometheusRule)

values_args() { [[ "$1" == default ]] || echo "-f $chart/$1"; }
slug() { [[ "$1" == default ]] && echo default || basename "$1" .yaml; }

lint_all() {
  local h v k
  for h in "$HELM3" "$HELM4"; do
    for v in "${value_sets[@]}"; do
      for k in 1.30.0 1.35.0; do
        # shellcheck disable=SC2046
        "$h" lint --strict --quiet --kube-version "$k" "$chart" $(values_args "$v") \
          >"$out/lint.log" 2>&1 ||
          { cat "$out/lint.log"; echo "helm $("$h" version --short) lint --strict failed for $v, $k" >&2; return 1; }
        echo "ok   $("$h" version --template '{{.Version}}') lint --strict --kube-version $k ($v)"
      done
    done
  done
}
step "helm lint --strict (helm 3 and 4; default, all-values, podmonitor-values; 1.30, 1.35)" lint_all

template_all() {
  local v k s
  for v in "${value_sets[@]}"; do
    s="$(slug "$v")"
    for k in "${kube_versions[@]}" 1.29.0; do
      # shellcheck disable=SC2046
      "$HELM4" template usernsguard "$chart" -n usernsguard-system --kube-version "$k" \
        "${monitoring_api[@]}" $(values_args "$v") >"$out/$s-$k.yaml"
    done
    for k in 1.30.0 1.35.0; do
      # shellcheck disable=SC2046
      "$HELM3" template usernsguard "$chart" -n usernsguard-system --kube-version "$k" \
        "${monitoring_api[@]}" $(values_args "$v") >"$out/$s-$k.helm3.yaml"
      cmp "$out/$s-$k.helm3.yaml" "$out/$s-$k.yaml" ||
        { echo "helm 3 and helm 4 render $v for $k differently" >&2; diff "$out/$s-$k.helm3.yaml" "$out/$s-$k.yaml" | head -20; return 1; }
      echo "ok   helm 3.18.0 and 4.1.4 template $v --kube-version $k: identical ($(grep -c '^kind:' "$out/$s-$k.yaml") objects)"
    done
  done
}
step "helm template (helm 3 and 4 identical; Kubernetes 1.29..1.35)" template_all

validate_all() {
  local v k s args=()
  for v in "${value_sets[@]}"; do
    s="$(slug "$v")"
    for k in "${kube_versions[@]}" 1.29.0; do args+=("$k=$out/$s-$k.yaml"); done
  done
  "$VENV/python" "$here/validate_manifests.py" --skip monitoring.coreos.com "${args[@]}" >"$out/validate.log" ||
    { grep -v '^ok' "$out/validate.log"; return 1; }
  grep -v '^ok' "$out/validate.log" || true
}
step "kubernetes-validate --strict 1.30..1.35 (+1.29 without the policy), CRs against the CRDs" validate_all

monitoring_all() {
  cp "$here/monitoring/validate-monitoring.mjs" "$MONITORING_PROJECT/"
  node "$MONITORING_PROJECT/validate-monitoring.mjs" 3 "$out/all-values-1.35.0.yaml" &&
    node "$MONITORING_PROJECT/validate-monitoring.mjs" 3 "$out/podmonitor-values-1.35.0.yaml" &&
    node "$MONITORING_PROJECT/validate-monitoring.mjs" 0 "$out/default-1.35.0.yaml"
}
step "ServiceMonitor, PodMonitor, PrometheusRule against the prometheus-operator schemas" monitoring_all

vap_all() {
  local k
  for k in 1.30.0 1.35.0; do
    "$VENV/python" "$here/vap/vap_test.py" "$out/default-$k.yaml"
  done
}
step "admission policy CEL (cel-python) on the rendered policies" vap_all

rules_all() {
  promtool check rules "$chart/files/alerts.yaml" &&
    promtool test rules "$here/alerts_test.yaml"
}
step "promtool check rules + test rules (files/alerts.yaml)" rules_all

step "dashboard type-check (tsc --strict, @grafana/schema 12.4.11)" \
  python3 "$here/dashboard/typecheck.py" "$TSC_PROJECT" "$chart/files/dashboard.json"

step "values.schema.json rejects bad values (helm 3 and 4)" \
  "$VENV/python" "$here/schema_test.py" "$HELM3" "$HELM4"

step "rendered objects (helm 3 and 4), files/crds == crds/, flags and port vs the binary" \
  "$VENV/python" "$here/render_test.py" "$HELM3" "$HELM4" "$binary"

step "dashboard queries and probe paths against selftest --serve scraped by Prometheus" \
  "$VENV/python" "$here/live_test.py" "$binary" "$out/default-1.35.0.yaml" \
  "$chart/files/dashboard.json" "$chart/files/alerts.yaml"

printf '\nchart tests took %ss\n' "$(since "$t_all")"
echo "chart: $steps passed, 0 failed"
