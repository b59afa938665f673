#!/usr/bin/env bash
# Join this machine to the Ray cluster that start-cluster.sh started, and stay in the
# foreground until the node stops (the script then exits non-zero). SIGTERM / Ctrl-C stops
# the node and everything it started.
#
#   HPO_RAY_HEAD=10.0.0.1:6380 deploy/ray/join-cluster.sh
#
# It needs the head's Ray token (never makes one: it would not match): RAY_AUTH_TOKEN, or the
# file HPO_RAY_TOKEN_FILE (default $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token), mode 0600.
#
# Settings (environment):
#   HPO_RAY_HEAD        the head's address, <ip>:<port>            [required]
#   HPO_NODE_IP         this node's address as the others reach it [Ray's guess]
#   HPO_READY_TIMEOUT_S deadline for each readiness wait           [180]
#   HPO_RAY_START_ARGS  more `ray start` arguments (e.g. --num-gpus=4 --temp-dir=/local/ray)
#   HPO_LOG_DIR         where the Ray log goes                     [./hpo-logs]
#   HPO_STOP_GRACE_S    SIGTERM → SIGKILL grace when stopping      [15]
#   HPO_STORAGE_PATH    when set to a path: checked to be the head's (its .hpo-ray-head
#                       marker names HPO_RAY_HEAD), since checkpoints must be shared
# Functions below run from traps and wait loops, which shellcheck cannot follow:
# shellcheck disable=SC2329
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

head=${HPO_RAY_HEAD:?set HPO_RAY_HEAD to the head\'s address, e.g. 10.0.0.1:6380}
timeout=${HPO_READY_TIMEOUT_S:-180}
logs=${HPO_LOG_DIR:-$PWD/hpo-logs}
read -ra ray_args <<<"${HPO_RAY_START_ARGS:-}"
if [[ -n ${HPO_NODE_IP:-} ]]; then
  ray_args+=("--node-ip-address=$HPO_NODE_IP")
fi
mkdir -p "$logs"
hpo_ray_token require
if [[ -n ${HPO_STORAGE_PATH:-} && $HPO_STORAGE_PATH != *://* ]]; then
  marker=$HPO_STORAGE_PATH/.hpo-ray-head
  if [[ "$(cat "$marker" 2>/dev/null)" != "$head" ]]; then
    hpo_die "HPO_STORAGE_PATH=$HPO_STORAGE_PATH is not the head's shared storage here" \
      "($marker does not name $head): mount the same shared filesystem at the same path"
  fi
fi

ray_pid=""
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n $ray_pid ]]; then
    hpo_stop_groups "$ray_pid"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

hpo_wait_until "$timeout" "the Ray head at $head to accept connections" hpo_port_open "$head"
# A wrong token and a head still starting look alike from here: both report no node.
hpo_wait_until "$timeout" "the Ray head at $head to accept this node's token" \
  hpo_ray_has_nodes "$head" 1
log="$logs/ray-node-$(hostname)-$$.log"
hpo_log "joining $head (log: $log)"
setsid ray start --block --address="$head" --disable-usage-stats "${ray_args[@]}" \
  >"$log" 2>&1 &
ray_pid=$!
hpo_wait_until "$timeout" "this node to start" hpo_ray_started "$ray_pid" "$log"
hpo_log "joined: the cluster has $(hpo_ray_nodes "$head") node(s)"
wait "$ray_pid" || true
hpo_die "the Ray node exited (log: $log)"
