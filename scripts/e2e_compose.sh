#!/usr/bin/env bash
# End-to-end check of the compose stack on a Docker engine:
#   build -> docker compose up -d -> the service runs as uid 10001 and its HEALTHCHECK turns healthy -> a
#   prediction through the published port -> Prometheus reports the service target up with lcs_ series ->
#   Grafana serves the provisioned dashboard -> SIGTERM (compose stop) exits 0 in time -> compose down.
# Usage: scripts/e2e_compose.sh          (pytest -m docker runs it; it skips where no engine answers)
# Environment: E2E_PROJECT (compose project, default lcs-e2e), E2E_TIMEOUT (seconds to wait, default 300),
# E2E_SERVICES (services to start, default all that `docker compose up` starts), LCS_PUBLISH_PORT,
# PROMETHEUS_PUBLISH_PORT, GRAFANA_PUBLISH_PORT (defaults 18000/19090/13000, away from a running stack),
# and the compose variables BASE_IMAGE, WHEELS, PROMETHEUS_IMAGE, GRAFANA_IMAGE for offline builds
# (deploy/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

export LCS_PUBLISH_PORT=${LCS_PUBLISH_PORT:-18000}
export PROMETHEUS_PUBLISH_PORT=${PROMETHEUS_PUBLISH_PORT:-19090}
export GRAFANA_PUBLISH_PORT=${GRAFANA_PUBLISH_PORT:-13000}
export LCS_BIND=127.0.0.1
project=${E2E_PROJECT:-lcs-e2e}
timeout=${E2E_TIMEOUT:-300}
read -r -a services <<< "${E2E_SERVICES:-}"
compose=(docker compose -p "$project")

say() { printf 'e2e: %s\n' "$*"; }
fail() { say "FAILED: $*"; "${compose[@]}" ps -a || true; "${compose[@]}" logs --tail 80 || true; exit 1; }

docker info >/dev/null 2>&1 || { say "no Docker engine answers (docker info failed)"; exit 2; }
docker compose version >/dev/null 2>&1 || { say "the docker compose plugin is missing"; exit 2; }
[[ -f models/structured_line.safetensors ]] || {
  say "models/structured_line.safetensors is missing: train it first (python -m training train configs/structured_line.yaml)"
  exit 2
}

trap '"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true' EXIT

say "build"
"${compose[@]}" build lcs \
  || fail "build (offline: scripts/offline_images.sh, then BASE_IMAGE=lcs-base WHEELS=deploy/docker/wheels; deploy/README.md)"
say "up ${services[*]:-(all default services)}"
"${compose[@]}" up -d ${services[@]+"${services[@]}"}  # (an empty array under set -u: bash < 4.4 aborts)

# $1: URL; $2: python expression on `body` (the decoded JSON) that must hold; polls until $timeout
wait_for() {
  local url=$1 check=$2 deadline=$((SECONDS + timeout))
  until python3 - "$url" "$check" <<'PY'
import json, sys, urllib.request
url, check = sys.argv[1], sys.argv[2]
try:
    body = json.load(urllib.request.urlopen(url, timeout=5))
except Exception:
    sys.exit(1)
sys.exit(0 if eval(check, {"body": body}) else 1)
PY
  do
    (( SECONDS < deadline )) || return 1
    sleep 2
  done
}

lcs=http://127.0.0.1:$LCS_PUBLISH_PORT
prom=http://127.0.0.1:$PROMETHEUS_PUBLISH_PORT
say "wait for $lcs/readyz"
wait_for "$lcs/readyz" 'body["status"] == "ready"' || fail "the service never became ready"

say "the image: non-root, HEALTHCHECK healthy, LCS_THREADS left to the service"
cid=$("${compose[@]}" ps -q lcs)
[[ $(docker exec "$cid" id -u) == 10001 ]] || fail "the service does not run as uid 10001"
deadline=$((SECONDS + timeout))
until [[ $(docker inspect -f '{{.State.Health.Status}}' "$cid") == healthy ]]; do
  (( SECONDS < deadline )) || fail "the HEALTHCHECK never reported healthy"
  sleep 2
done
# compose leaves LCS_THREADS unset unless this shell sets it, so the service picks its own default
if [[ -z ${LCS_THREADS:-} ]] && docker exec "$cid" printenv LCS_THREADS >/dev/null; then
  fail "LCS_THREADS is set in the container, though this shell leaves it unset"
fi

say "predict through the published port"
python3 - "$lcs" <<'PY' || fail "prediction"
import json, sys, urllib.request
base = sys.argv[1]
spec = json.load(urllib.request.urlopen(base + "/model", timeout=10))["input"]
image = [[[0] * spec["width"] for _ in range(spec["height"])] for _ in range(spec["channels"])]
for quality in (1.0, 0.0):
    req = urllib.request.Request(base + "/predict", json.dumps({"inputs": [image], "quality": quality}).encode(),
                                 {"content-type": "application/json"})
    out = json.load(urllib.request.urlopen(req, timeout=30))
    assert out["predictions"] and 0.0 <= out["alpha"] <= quality, out
    print(f"e2e: quality {quality}: alpha {out['alpha']}, {out['predictions'][0]['label']}")
PY

if [[ ${#services[@]} -eq 0 || " ${services[*]} " == *" prometheus "* ]]; then
  say "wait for Prometheus to report the lcs target up"
  wait_for "$prom/api/v1/targets?state=active" \
    'any(t["labels"]["job"] == "lcs" and t["health"] == "up" for t in body["data"]["activeTargets"])' \
    || fail "Prometheus does not scrape the service"
  wait_for "$prom/api/v1/query?query=count(%7B__name__%3D~%22lcs_.%2B%22%7D)" \
    'body["data"]["result"] and float(body["data"]["result"][0]["value"][1]) > 10' \
    || fail "no lcs_ series in Prometheus"
  wait_for "$prom/api/v1/query?query=lcs_requests_total%7Bendpoint%3D%22%2Fpredict%22%7D" \
    'len(body["data"]["result"]) > 0' || fail "the prediction is not counted in Prometheus"
  wait_for "$prom/api/v1/rules" 'len(body["data"]["groups"]) == 2' || fail "rules not loaded"
fi
if [[ ${#services[@]} -eq 0 || " ${services[*]} " == *" grafana "* ]]; then
  say "wait for Grafana and its provisioned dashboard"
  wait_for "http://127.0.0.1:$GRAFANA_PUBLISH_PORT/api/dashboards/uid/lcs-serve" \
    'body["dashboard"]["title"] == "lcs-serve"' || fail "Grafana dashboard not provisioned"
fi

# SIGTERM drains, then the process exits by itself: code 0, well inside stop_grace_period (25 s; a SIGKILL at it would exit 137)
say "stop lcs (SIGTERM)"
start=$SECONDS
"${compose[@]}" stop lcs
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
say "lcs exited with code $code after $((SECONDS - start)) s"
[[ $code == 0 && $((SECONDS - start)) -lt 20 ]] || fail "lcs did not exit cleanly on SIGTERM"

say "down"
"${compose[@]}" down -v --remove-orphans
trap - EXIT
say "passed"
