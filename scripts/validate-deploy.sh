#!/usr/bin/env bash
# Validates the deployment files under deploy/ (part of the gate):
#
#   - every Kubernetes manifest, and the kustomize output, against the
#     Kubernetes OpenAPI schemas in strict mode (kubernetes-validate, which
#     ships the schemas: works offline once installed), for the oldest and
#     the newest Kubernetes version we claim;
#   - the project's own rules for the pods (non-root, read-only root, no
#     capabilities, seccomp, limits, no secret in an environment variable)
#     and the StatefulSet ordinal -> node id mapping against the fleet file;
#   - the fleet file through the `fleet` binary's parser, if it was built;
#   - the systemd unit with `systemd-analyze verify`, if systemd is there;
#   - the start script with `sh -n` (and shellcheck, if installed).
#
# Installs kubernetes-validate into a virtualenv under ~/.cache when it is
# missing. Fails on the first error; ends with a count.
#
#   scripts/validate-deploy.sh [DEPLOY_DIR]     (default: deploy)
set -euo pipefail
cd "$(dirname "$0")/.."
deploy=${1:-deploy}
k8s="$deploy/kubernetes"

# Schemas: the oldest Kubernetes the manifests are written for (StatefulSet
# PVC retention is beta and on by default from 1.27; 1.30 is our floor) and
# the newest the pinned validator knows.
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
VALIDATOR_VERSION=1.37.0
venv=${XDG_CACHE_HOME:-$HOME/.cache}/hsm-vault/validate-deploy-venv-$VALIDATOR_VERSION

passed=0
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { echo "FAILED: $*" >&2; echo "validate-deploy: $passed passed, 1 failed"; exit 1; }

if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "installing kubernetes-validate $VALIDATOR_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$VALIDATOR_VERSION"
fi
py="$venv/bin/python"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Every manifest file (kustomization.yaml is not a Kubernetes object: it is
# checked by rendering it below).
mapfile -t manifests < <(find "$k8s" -name '*.yaml' ! -name kustomization.yaml | sort)
[ "${#manifests[@]}" -gt 0 ] || fail "no manifest under $k8s"

schema_check() { # LABEL FILES...
  local label=$1 v out
  shift
  for v in $K8S_VERSIONS; do
    # A missing schema is only a warning to the tool: here it is an error.
    if ! out=$("$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$@" 2>&1) \
      || grep -q . <<<"$out"; then
      echo "$out" >&2
      fail "$label: schema check against Kubernetes $v"
    fi
  done
  pass "$label: strict schema check (Kubernetes ${K8S_VERSIONS// /, })"
}
schema_check "${#manifests[@]} manifest files" "${manifests[@]}"

rendered=""
if command -v kubectl >/dev/null; then
  rendered="$tmp/rendered.yaml"
  kubectl kustomize "$k8s" >"$rendered" || fail "kubectl kustomize $k8s"
  schema_check "kustomize output ($(grep -c '^kind:' "$rendered") objects)" "$rendered"
else
  echo "skipped: kubectl not installed (kustomize output not rendered)"
fi

# The project's own rules, on the files and on the rendered output.
"$py" - "$k8s" "$rendered" "${manifests[@]}" <<'PY' || fail "pod and fleet rules (above)"
import re, sys, tomllib, yaml

k8s, rendered, files = sys.argv[1], sys.argv[2], sys.argv[3:]
errors = []
docs = []
for f in files + ([rendered] if rendered else []):
    with open(f) as fh:
        docs += [(f, d) for d in yaml.safe_load_all(fh) if d]

def check_pod(where, pod):
    sc = pod.get("securityContext", {})
    if sc.get("runAsNonRoot") is not True:
        errors.append(f"{where}: pod securityContext.runAsNonRoot must be true")
    if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        errors.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    if pod.get("automountServiceAccountToken") is not False:
        errors.append(f"{where}: automountServiceAccountToken must be false")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        n = f"{where} container {c['name']}"
        csc = c.get("securityContext", {})
        if csc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{n}: readOnlyRootFilesystem must be true")
        if csc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{n}: allowPrivilegeEscalation must be false")
        if csc.get("capabilities", {}).get("drop") != ["ALL"]:
            errors.append(f"{n}: capabilities must drop ALL")
        if csc.get("privileged"):
            errors.append(f"{n}: must not be privileged")
        lim = c.get("resources", {}).get("limits", {})
        if "memory" not in lim or "cpu" not in lim:
            errors.append(f"{n}: needs cpu and memory limits")
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                errors.append(f"{n}: secret {e['name']} in an environment variable (mount it as a file)")
            if e["name"] == "HSM_VAULT_PIN":
                errors.append(f"{n}: HSM_VAULT_PIN in the environment (use a PIN file)")
        names = {p.get("name") for p in c.get("ports", [])}
        numbers = {p.get("containerPort") for p in c.get("ports", [])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            pr = c.get(probe) or {}
            for how in ("tcpSocket", "httpGet", "grpc"):
                port = (pr.get(how) or {}).get("port")
                if isinstance(port, str) and port not in names:
                    errors.append(f"{n}: {probe} names port {port!r}, which the container does not declare")
                if isinstance(port, int) and port not in numbers:
                    errors.append(f"{n}: {probe} probes port {port}, which the container does not declare")
        for ef in c.get("envFrom", []):
            if "secretRef" in ef:
                errors.append(f"{n}: envFrom a Secret (mount it as a file)")

with open(f"{k8s}/fleet.toml", "rb") as fh:
    fleet = tomllib.load(fh)
nodes = {n["id"]: n for n in fleet.get("node", [])}
seen_ids = {}
for f, d in docs:
    kind, name = d.get("kind"), d.get("metadata", {}).get("name")
    where = f"{f}: {kind}/{name}"
    if kind == "Secret":
        for k, v in {**d.get("data", {}), **d.get("stringData", {})}.items():
            if v != "PLACEHOLDER" and not v.startswith("PLACEHOLDER"):
                errors.append(f"{where}: key {k} holds something other than a placeholder")
    if kind not in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
        continue
    pod = d["spec"]["template"]["spec"]
    check_pod(where, pod)
    if kind != "StatefulSet" or f == rendered:
        continue
    # Ordinal -> node id: every pod the StatefulSet runs is a node of the
    # fleet file in the StatefulSet's region, at the pod's DNS name.
    env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
    base = int(env.get("HSM_VAULT_NODE_ID_BASE", "-1"))
    region = d["spec"]["template"]["metadata"]["labels"].get("hsm-vault/region")
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    pinned = [v for t in terms for m in t["matchExpressions"]
              if m["key"] == "topology.kubernetes.io/region" for v in m["values"]]
    if pinned != [region]:
        errors.append(f"{where}: node affinity {pinned} is not its region {region}")
    ns = d["metadata"].get("namespace", "hsm-vault")
    svc = d["spec"]["serviceName"]
    for ordinal in range(d["spec"].get("replicas", 1)):
        nid = base + ordinal
        host = f"{name}-{ordinal}.{svc}.{ns}.svc.cluster.local"
        n = nodes.get(nid)
        if n is None:
            errors.append(f"{where}: pod {name}-{ordinal} is node {nid}, which the fleet file does not declare")
            continue
        if nid in seen_ids:
            errors.append(f"{where}: node {nid} is also {seen_ids[nid]}")
        seen_ids[nid] = f"{name}-{ordinal}"
        if n["region"] != region:
            errors.append(f"{where}: node {nid} is in {n['region']} in the fleet file, not {region}")
        for key, port in (("addr", 7700), ("peer_addr", 7800)):
            if n.get(key) != f"{host}:{port}":
                errors.append(f"{where}: node {nid} {key} {n.get(key)!r} is not {host}:{port}")
missing = sorted(set(nodes) - set(seen_ids))
if missing:
    errors.append(f"fleet file nodes {missing} have no pod (they would count in the quorum)")
for e in errors:
    print("  " + e, file=sys.stderr)
sys.exit(1 if errors else 0)
PY
pass "pod security, limits, probe ports, no secret in env, StatefulSet ordinals = fleet file nodes"

fleet_bin=""
for b in target/debug/fleet target/release/fleet; do
  [ -x "$b" ] && fleet_bin=$b && break
done
if [ -n "$fleet_bin" ]; then
  "$fleet_bin" certs --fleet-file "$k8s/fleet.toml" --out "$tmp/certs" >/dev/null \
    || fail "the fleet file $k8s/fleet.toml (parsed by $fleet_bin)"
  pass "fleet file parsed by $fleet_bin"
else
  echo "skipped: no built fleet binary (fleet file not parsed by the vault's own parser)"
fi

if command -v systemd-analyze >/dev/null; then
  # verify wants ExecStart's program to exist: point it at the repository's.
  unit="$tmp/hsm-vault.service"
  sed "s#/usr/local/bin/hsm-vault-start#$PWD/$deploy/bin/hsm-vault-start#" \
    "$deploy/systemd/hsm-vault.service" >"$unit"
  if ! out=$(systemd-analyze verify "$unit" 2>&1) || grep -q . <<<"$out"; then
    echo "$out" >&2
    fail "systemd-analyze verify $deploy/systemd/hsm-vault.service"
  fi
  pass "systemd-analyze verify hsm-vault.service"
else
  echo "skipped: systemd-analyze not installed (unit not verified)"
fi

sh -n "$deploy/bin/hsm-vault-start" || fail "sh -n $deploy/bin/hsm-vault-start"
if command -v shellcheck >/dev/null; then
  shellcheck "$deploy/bin/hsm-vault-start" "$deploy/provision/"*.sh scripts/validate-deploy.sh \
    || fail "shellcheck"
fi
pass "start script syntax"

echo "validate-deploy: $passed passed, 0 failed"
