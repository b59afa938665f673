# shellcheck shell=bash
# Helpers for start-cluster.sh and join-cluster.sh (sourced, not run). Every wait has a
# deadline and ends the script with a message and a non-zero status when it passes: a recipe
# that cannot come up must say so, not sit "healthy" until someone looks.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "hpo-deploy: needs bash 4.4 or newer (this is $BASH_VERSION)" >&2
  exit 2
fi

hpo_log() { echo "[hpo-deploy $(date +%H:%M:%S)] $*" >&2; }

hpo_die() {
  hpo_log "error: $*"
  exit 1
}

# hpo_ray_token create|require: make the Ray cluster token available to this script and every
# process it starts (RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, which is
# how Ray >= 2.52 finds it). `create` (the head) writes a new random token to the file, mode
# 0600, when there is none; `require` (a joining node) fails instead: a token of its own would
# never match the head's.
hpo_ray_token() {
  local mode=$1 file perms tmp
  export RAY_AUTH_MODE=token
  if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
    return 0
  fi
  file=${HPO_RAY_TOKEN_FILE:-${RAY_AUTH_TOKEN_PATH:-${HOME:?HOME is unset: set HPO_RAY_TOKEN_FILE or RAY_AUTH_TOKEN}/.ray/auth_token}}
  if [[ ! -s $file ]]; then
    if [[ $mode != create ]]; then
      hpo_die "no Ray auth token: $file is missing or empty. Copy the head's token file there" \
        "(mode 0600), point HPO_RAY_TOKEN_FILE at it, or set RAY_AUTH_TOKEN."
    fi
    mkdir -p "$(dirname "$file")"
    tmp="$file.tmp.$$"
    # 256 random bits as hex, the format `ray get-auth-token --generate` writes
    (umask 077 && od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' >"$tmp")
    # ln refuses to replace a file: if another node created one meanwhile, theirs wins
    ln "$tmp" "$file" 2>/dev/null && hpo_log "created a Ray auth token in $file (mode 0600)"
    rm -f "$tmp"
  fi
  perms=$(stat -L -c %a "$file") # of the file a link (a mounted secret) points to
  if [[ $perms != 600 && $perms != 400 ]]; then
    hpo_die "$file has mode $perms: whoever reads it can run code on the cluster; chmod 600 $file"
  fi
  export RAY_AUTH_TOKEN_PATH=$file
}

# hpo_wait_until SECONDS WHAT COMMAND...: run COMMAND every second until it succeeds; after
# SECONDS, fail the script naming WHAT. COMMAND may itself end the script (a process it
# watches died), which is how the loops fail fast instead of running out the clock.
hpo_wait_until() {
  local limit=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      hpo_die "gave up after ${limit} s waiting for $what"
    fi
    sleep 1
  done
}

# hpo_alive PID WHAT LOG: end the script (with LOG's tail) when PID has exited.
hpo_alive() {
  if ! kill -0 "$1" 2>/dev/null; then
    tail -n 30 "$3" >&2 || true
    hpo_die "$2 exited (log: $3)"
  fi
}

# hpo_ray_started PID LOG: `ray start --block` (PID, logging to LOG) says the node is up.
hpo_ray_started() {
  hpo_alive "$1" "ray start" "$2"
  grep -qs "Ray runtime started" "$2"
}

# hpo_ray_nodes ADDRESS: how many nodes the cluster at ADDRESS reports alive (0 when it cannot
# be reached or refuses the token).
hpo_ray_nodes() {
  ray status --address="$1" 2>/dev/null |
    awk '/^(Active|Idle):$/ {s = 1; next} /^[A-Za-z].*:$/ {s = 0} s && /node_/ {n++} END {print n + 0}'
}

# hpo_port_open HOST:PORT: something accepts TCP connections there (cheaper than `ray status`).
hpo_port_open() {
  (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

# hpo_ray_has_nodes ADDRESS N [PID LOG]: at least N nodes are alive (and PID still runs).
hpo_ray_has_nodes() {
  if [[ -n ${3:-} ]]; then
    hpo_alive "$3" "ray start" "$4"
  fi
  (($(hpo_ray_nodes "$1") >= $2))
}

# hpo_healthy URL [PID LOG]: URL/healthz answers 200 (and PID, hpo serve, still runs).
hpo_healthy() {
  if [[ -n ${2:-} ]]; then
    hpo_alive "$2" "hpo serve" "$3"
  fi
  curl -fsS -m 5 -o /dev/null "$1/healthz" 2>/dev/null
}

# hpo_tree PGID...: the processes of these process groups or sessions (each started with
# setsid: PGID = SID) and, recursively, their children. Ray puts each worker in a process
# group of its own, so the group alone misses them; the session keeps them, orphaned or not.
hpo_tree() {
  ps -eo pid=,ppid=,pgid=,sid= | awk -v roots="$*" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) g[r[i]] = 1 }
    { pid[NR] = $1; ppid[NR] = $2; if ($3 in g || $4 in g) keep[$1] = 1 }
    END {
      do {
        added = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; added = 1 }
      } while (added)
      for (p in keep) print p
    }'
}

# hpo_any_alive PID...: one of these processes still runs (zombies do not count).
hpo_any_alive() {
  (($#)) && ps -o stat= -p "$(IFS=, && echo "$*")" 2>/dev/null | grep -qv '^Z'
}

# hpo_stop_groups PGID...: SIGTERM these process groups (each a process started with setsid:
# `ray start --block`, hpo serve), then SIGKILL every process of their trees still running
# after HPO_STOP_GRACE_S seconds (`ray start --block` can take minutes to drain on SIGTERM),
# and wait (5 s at most) until those are gone: a killed process with many threads and a large
# heap (gcs_server, a raylet) takes a moment to exit, and the caller's exit must mean they
# did. The tree is noted before the SIGTERM (a raylet that exits first orphans its workers)
# and while waiting.
hpo_stop_groups() {
  local pgid deadline pids
  deadline=$((SECONDS + ${HPO_STOP_GRACE_S:-15}))
  mapfile -t pids < <(hpo_tree "$@")
  for pgid in "$@"; do
    kill -TERM -- "-$pgid" 2>/dev/null || true
  done
  while hpo_any_alive "${pids[@]}" && ((SECONDS < deadline)); do
    sleep 0.5
    mapfile -t -O "${#pids[@]}" pids < <(hpo_tree "$@") # and what they start meanwhile
  done
  mapfile -t -O "${#pids[@]}" pids < <(hpo_tree "$@")
  if ((${#pids[@]})); then
    kill -KILL "${pids[@]}" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while hpo_any_alive "${pids[@]}" && ((SECONDS < deadline)); do
      sleep 0.1
    done
  fi
}
