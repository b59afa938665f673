#!/usr/bin/env bash
# Start a Ray head on this machine and an hpo control plane next to it, and keep both up:
# when either exits, the other is stopped and the script exits non-zero (run it under systemd,
# tmux or nohup). Ctrl-C / SIGTERM stops both.
#
#   export HPO_DATABASE_URL=postgresql://hpo@db/hpo HPO_STORAGE_PATH=/mnt/shared/hpo \
#          HPO_TOKEN=$(openssl rand -hex 24)
#   deploy/ray/start-cluster.sh
#   # on every other node (same Python environment, same token file):
#   HPO_RAY_HEAD=<head-ip>:6380 deploy/ray/join-cluster.sh
#
# HPO_STORAGE_PATH (checkpoints) must be shared by every node: as a path, it gets a marker
# file, .hpo-ray-head, that join-cluster.sh checks it sees.
#
# Ray token: taken from RAY_AUTH_TOKEN, else from HPO_RAY_TOKEN_FILE (default
# $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token), created there (mode 0600) when missing.
#
# Settings (environment):
#   HPO_RAY_PORT        Ray head (GCS) port                       [6380; Redis often holds 6379]
#   HEAD_IP             address the other nodes reach this one at [first of `hostname -I`]
#   HPO_HOST, HPO_PORT  where hpo serve listens                    [0.0.0.0, 8000]
#   HPO_RAY_MIN_NODES   Ray nodes to wait for before serving      [1: the head]
#   HPO_READY_TIMEOUT_S deadline for each readiness wait          [180]
#   HPO_RAY_START_ARGS  more `ray start` arguments (e.g. --num-gpus=4 --temp-dir=/local/ray)
#   HPO_LOG_DIR         where the Ray and hpo serve logs go       [./hpo-logs]
#   HPO_STOP_GRACE_S    SIGTERM → SIGKILL grace when stopping     [15]
# Functions below run from traps and wait loops, which shellcheck cannot follow:
# shellcheck disable=SC2329
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

: "${HPO_DATABASE_URL:?set HPO_DATABASE_URL, e.g. postgresql://hpo@db/hpo}"
: "${HPO_STORAGE_PATH:?set HPO_STORAGE_PATH to storage every node shares, e.g. /mnt/shared/hpo}"
: "${HPO_TOKEN:?set HPO_TOKEN (the API token clients use), e.g. \$(openssl rand -hex 24)}"
port=${HPO_RAY_PORT:-6380}
head_ip=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
[[ -n $head_ip ]] || hpo_die "cannot tell this machine's address; set HEAD_IP"
host=${HPO_HOST:-0.0.0.0}
case $host in # where this script asks hpo serve whether it is up
0.0.0.0 | "") probe_host=127.0.0.1 ;;
"::") probe_host="[::1]" ;; # hpo serve's IPv6 socket takes IPv6 only
*:*) probe_host="[$host]" ;; # an IPv6 address
*) probe_host=$host ;;
esac
serve_port=${HPO_PORT:-8000}
min_nodes=${HPO_RAY_MIN_NODES:-1}
timeout=${HPO_READY_TIMEOUT_S:-180}
logs=${HPO_LOG_DIR:-$PWD/hpo-logs}
read -ra ray_args <<<"${HPO_RAY_START_ARGS:-}"
mkdir -p "$logs"
hpo_ray_token create
if [[ $HPO_STORAGE_PATH != *://* ]]; then # a shared path: mark it, join-cluster.sh looks
  mkdir -p "$HPO_STORAGE_PATH"
  echo "$head_ip:$port" >"$HPO_STORAGE_PATH/.hpo-ray-head" ||
    hpo_die "cannot write to HPO_STORAGE_PATH=$HPO_STORAGE_PATH"
fi

ray_pid=""
serve_pid=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $serve_pid ]]; then
    hpo_stop_groups "$serve_pid"
  fi
  if [[ -n $ray_pid ]]; then
    hpo_stop_groups "$ray_pid"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

hpo_log "starting the Ray head at $head_ip:$port (log: $logs/ray-head.log)"
setsid ray start --head --block --port="$port" --node-ip-address="$head_ip" \
  --disable-usage-stats "${ray_args[@]}" >"$logs/ray-head.log" 2>&1 &
ray_pid=$!
hpo_wait_until "$timeout" "the Ray head" hpo_ray_started "$ray_pid" "$logs/ray-head.log"
hpo_wait_until "$timeout" "$min_nodes Ray node(s) to join $head_ip:$port" \
  hpo_ray_has_nodes "$head_ip:$port" "$min_nodes" "$ray_pid" "$logs/ray-head.log"
hpo_log "Ray is up with $(hpo_ray_nodes "$head_ip:$port") node(s)." \
  "Join others with: HPO_RAY_HEAD=$head_ip:$port $(printf %q "$here/join-cluster.sh")" \
  "(their token: ${RAY_AUTH_TOKEN_PATH:-RAY_AUTH_TOKEN})"

export HPO_RAY_ADDRESS="$head_ip:$port"
export HPO_PUBLIC_URL=${HPO_PUBLIC_URL:-http://$head_ip:$serve_port}
hpo_log "starting hpo serve on $host:$serve_port (log: $logs/hpo-serve.log)"
setsid hpo serve --host "$host" --port "$serve_port" >"$logs/hpo-serve.log" 2>&1 &
serve_pid=$!
hpo_wait_until "$timeout" "hpo serve's /healthz" \
  hpo_healthy "http://$probe_host:$serve_port" "$serve_pid" "$logs/hpo-serve.log"
hpo_log "ready: API at $HPO_PUBLIC_URL (Bearer \$HPO_TOKEN), Ray at $HPO_RAY_ADDRESS"

# Whichever ends first ends the other (the EXIT trap), with a non-zero status.
wait -n "$ray_pid" "$serve_pid" || true
if kill -0 "$serve_pid" 2>/dev/null; then
  hpo_die "the Ray head exited (log: $logs/ray-head.log); stopping hpo serve"
fi
hpo_die "hpo serve exited (log: $logs/hpo-serve.log); stopping the Ray head"
