#!/usr/bin/env bash
# tests/soak.sh — soak: a stream of files from one agent to another while
# broker nodes and agents are killed with `kill -9` and restarted, for a
# bounded time; then every file is checked.
#
# For SOAK_MINUTES (default 2) minutes:
#   - a dropper writes files of random sizes (0..5 MiB, random bytes) into
#     alpha's outbox (written under a hidden name, then renamed in) and notes
#     each one's SHA-256 in a manifest;
#   - every few seconds one fault. On a RabbitMQ node (one at a time: the
#     next only once the cluster is whole again; undone in the background
#     while the other faults go on): `kill -9`, started again a few seconds
#     later with local-cluster.sh start N; SIGSTOP for 3 to 20 s (a hung
#     node: past net_ticktime the others count it out), then SIGCONT; a
#     disk alarm (`set_disk_free_limit` above the disk's size, publishers
#     blocked cluster-wide) for 2 to 12 s, then the limit restored. On the
#     sending agent (alpha) or the receiving agent (beta): `kill -9`,
#     restarted after up to two seconds, or SIGSTOP for 1 to 8 s, then
#     SIGCONT. A full disk (one at a time): the sender's outbox and state
#     directory (spool, state database; one filesystem, as claims rename into
#     the spool) or the receiver's state directory, each on a tmpfs of its
#     own (SOAK_STATE_SIZE, default 2g), filled to the last byte for 2 to
#     12 s, then emptied (the dropper writes each file elsewhere first and
#     copies it in under a hidden name, again until it fits). Only pids this script started or read from
#     local-cluster.sh are signalled, and whatever it stopped, alarmed or
#     filled is undone on exit.
#   - with SOAK_NETNS=1, also network partitions (one at a time, as a node
#     fault): a RabbitMQ node cut off from the other nodes and both agents,
#     or one agent cut off from one node, for 3 to 20 s, then healed. The
#     cluster and both agents then run each in a network namespace of its
#     own (tests/netns-cluster.sh: a private subnet inside namespaces this
#     script creates and deletes; needs root), with RabbitMQ's partition
#     handling set to pause_minority, as its documentation recommends.
# Then everything runs again and the script waits for quiescence (every file
# settled on both sides, QUIESCE_SECONDS, default 600), and checks: every file
# is in beta's inbox byte for byte, its success hook ran exactly once, the
# sender's hook at most once per transfer, nothing stray or partial in the
# inbox, nothing written outside the agents' directories. A kill that lands
# while beta's success hook runs leaves `hook_interrupted` (never re-run
# silently, by design); for those whose hook never ran, the script does what
# an operator does, `hakobu rerun`, and says so.
#
# It prints one figures line, e.g.
#   soak: 21 faults injected, 143 files, 0 lost, 0 corrupted, 0 duplicate hooks, 0 missed hooks, 0 writes outside inbox
# and exits 0 only if every figure is zero and no transfer failed.
#
# The cluster: HAKOBU_TEST_AMQP_URLS (three URLs, comma-separated) with the
# HAKOBU_RMQ_* variables that local-cluster.sh needs to find those nodes
# (as tests/run.sh exports them); when HAKOBU_TEST_AMQP_URLS is unset, the
# script starts a cluster of its own (HAKOBU_RMQ_NAME=soak, ports 5972-5974,
# unless set) and stops it at the end. Nodes it took down are always started
# again, also on failure or Ctrl-C. A node that is not back in the cluster
# 90 s after its SIGCONT (RabbitMQ 3.10's partition handling can go on
# restarting nodes) is restarted as an operator would (`kill -9`, then
# started again), counted and said; it fails the soak only if that does not
# make the cluster whole either. With SOAK_NETNS=1 the soak always makes a
# cluster of its own in namespaces, and removes it.
#
# Root is needed for the tmpfs mounts; SOAK_DISK_FULL=0 leaves the full-disk
# faults out (and the state directories on the work directory's disk).
# Other knobs: SOAK_SEED (random seed; printed, to replay a run's choices),
# HAKOBU_BIN (the binary; default target/release/hakobu, built with cargo),
# SOAK_KEEP=1 (keep the work directory even on success).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CLUSTER=$ROOT/packaging/rabbitmq/local-cluster.sh
MINUTES=${SOAK_MINUTES:-2}
QUIESCE=${QUIESCE_SECONDS:-600}
SEED=${SOAK_SEED:-$(date +%s)}
[[ $MINUTES =~ ^[0-9]+$ ]] || { echo "SOAK_MINUTES must be a whole number" >&2; exit 2; }
RANDOM=$SEED

log() { printf 'soak [%4ds]: %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# A random number in 0..$1-1 (30 bits of randomness).
rand() { echo $((((RANDOM << 15) | RANDOM) % $1)); }
# Sleep a random time between $1 and $2 milliseconds.
rsleep() {
  local ms=$(($1 + $(rand $(($2 - $1 + 1)))))
  sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
}

command -v sha256sum >/dev/null || die "sha256sum not found"

# --- the binary -------------------------------------------------------------
if [[ -n ${HAKOBU_BIN:-} ]]; then
  BIN=$HAKOBU_BIN
else
  log "building hakobu (cargo build --release)"
  cargo build --release -q
  BIN=$ROOT/target/release/hakobu
fi
[[ -x $BIN ]] || die "no hakobu binary at $BIN"

# --- the work directory and state that cleanup needs ---------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hakobu-soak.XXXXXX")
ALPHA_PID='' BETA_PID='' DROPPER_PID='' NODE_DOWN='' NODE_JOB='' OWN_CLUSTER='' RESULT=1
# SOAK_NETNS=1: the cluster and the agents in network namespaces.
NETNS=${SOAK_NETNS:-0}
# The node fault under way (kill | hang | alarm | cut: a partition) and, for
# a hang, its pid.
NODE_FAULT='' NODE_PID=''
DISK_LIMIT=50MB
# Full disks: the tmpfs mounts made, and the job that empties the full one.
DISK_FULL=${SOAK_DISK_FULL:-1} MOUNTS=() FILL_JOB=''

# shellcheck disable=SC2317 # (trap handler)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in $DROPPER_PID $ALPHA_PID $BETA_PID; do
    kill -CONT "$pid" 2>/dev/null || true
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # A hung node gets its SIGCONT, an alarm its limit back, whatever
  # happened to the job that was to undo them.
  if [[ $NODE_FAULT == hang ]]; then kill -CONT "$NODE_PID" 2>/dev/null || true; fi
  if [[ $NODE_FAULT == cut ]]; then "$CLUSTER" heal-all >>"$WORK/cluster.log" 2>&1 || true; fi
  if [[ $NODE_FAULT == alarm ]]; then
    "$CLUSTER" ctl "$NODE_DOWN" set_disk_free_limit "$DISK_LIMIT" >>"$WORK/cluster.log" 2>&1 || true
  fi
  # A node being started again is left to finish booting, then checked.
  if [[ -n $NODE_JOB ]]; then wait "$NODE_JOB" 2>/dev/null && NODE_DOWN=''; fi
  if [[ $NODE_FAULT != kill && $NODE_FAULT != hang ]]; then NODE_DOWN=''; fi
  if [[ $NODE_FAULT == hang ]] && "$CLUSTER" pid "$NODE_DOWN" >/dev/null 2>&1; then NODE_DOWN=''; fi
  # (A cluster of our own is removed whole instead.)
  if [[ -n $NODE_DOWN && -z $OWN_CLUSTER ]]; then
    log "starting RabbitMQ node $NODE_DOWN again"
    "$CLUSTER" start "$NODE_DOWN" >>"$WORK/cluster.log" 2>&1 || log "could not start node $NODE_DOWN (see $WORK/cluster.log)"
  fi
  if [[ -n $OWN_CLUSTER ]]; then
    "$CLUSTER" down >>"$WORK/cluster.log" 2>&1 || true
  fi
  if [[ -n $FILL_JOB ]]; then kill "$FILL_JOB" 2>/dev/null || true; wait "$FILL_JOB" 2>/dev/null || true; fi
  for m in "${MOUNTS[@]}"; do
    rm -f "$m/.soak-ballast"
    umount "$m" 2>/dev/null || log "could not unmount $m"
  done
  if [[ $RESULT -eq 0 && $rc -eq 0 && -z ${SOAK_KEEP:-} ]]; then
    rm -rf "$WORK"
  else
    log "work directory kept: $WORK (agent logs: $WORK/alpha.log, $WORK/beta.log)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the cluster ---------------------------------------------------------------
if [[ $NETNS != 0 ]]; then
  [[ $EUID -eq 0 ]] || die "SOAK_NETNS=1 makes network namespaces and needs root"
  CLUSTER=$ROOT/tests/netns-cluster.sh
  export HKBP_ID=hkbp-$$ HKBP_BASE=$WORK/rmq
  log "starting a RabbitMQ cluster of our own in network namespaces ($HKBP_ID-*)"
  OWN_CLUSTER=1
  HAKOBU_TEST_AMQP_URLS=$("$CLUSTER" up 2>>"$WORK/cluster.log" | paste -sd,) ||
    die "the cluster in namespaces did not start (see $WORK/cluster.log)"
elif [[ -z ${HAKOBU_TEST_AMQP_URLS:-} ]]; then
  export HAKOBU_RMQ_NAME=${HAKOBU_RMQ_NAME:-soak}
  export HAKOBU_RMQ_PORTS=${HAKOBU_RMQ_PORTS:-5972 5973 5974}
  export HAKOBU_RMQ_BASE=${HAKOBU_RMQ_BASE:-$WORK/rmq}
  log "starting a RabbitMQ cluster of our own ($HAKOBU_RMQ_NAME, ports $HAKOBU_RMQ_PORTS)"
  OWN_CLUSTER=1
  HAKOBU_TEST_AMQP_URLS=$("$CLUSTER" up 2>>"$WORK/cluster.log" | paste -sd,) ||
    die "the cluster did not start (see $WORK/cluster.log)"
fi
IFS=, read -r -a URLS <<<"$HAKOBU_TEST_AMQP_URLS"
[[ ${#URLS[@]} -eq 3 ]] || die "HAKOBU_TEST_AMQP_URLS must hold three URLs"
# The nodes local-cluster.sh controls must be the ones the URLs name.
[[ $NETNS != 0 || $("$CLUSTER" urls | paste -sd,) == "$HAKOBU_TEST_AMQP_URLS" ]] ||
  die "local-cluster.sh (HAKOBU_RMQ_NAME/PORTS/BASE) does not control the cluster of HAKOBU_TEST_AMQP_URLS"
# Waits up to $1 s for the cluster to be whole; 0 when it is.
whole_within() {
  local _
  for _ in $(seq "$1"); do "$CLUSTER" status >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}
# A test that ran just before may have restarted a node that is still
# rejoining: the soak waits up to 120 s for the cluster to be whole.
whole_within 120 || die "the cluster is not healthy after 120 s: $("$CLUSTER" status 2>&1)"

# --- two agents --------------------------------------------------------------
A=soak-alpha-$$
B=soak-beta-$$
# What a full-disk fault fills: alpha's outbox and state, beta's state.
FULL_DIRS=("$WORK/alpha" "$WORK/beta/state")
mkdir -p "${FULL_DIRS[@]}"
if [[ $DISK_FULL != 0 ]]; then
  [[ $EUID -eq 0 ]] || die "the full-disk faults mount a tmpfs and need root (SOAK_DISK_FULL=0 leaves them out)"
  for d in "${FULL_DIRS[@]}"; do
    mount -t tmpfs -o "size=${SOAK_STATE_SIZE:-2g},mode=700" soak "$d" || die "cannot mount a tmpfs on $d"
    MOUNTS+=("$d")
  done
fi
mkdir -p "$WORK/alpha/outbox" "$WORK/beta/inbox" "$WORK/hooks" "$WORK/stage"
HOOK=$WORK/hooks/hook.sh
cat >"$HOOK" <<EOF
#!/bin/sh
# One line per run: transfer id, event, file name, error code.
echo "\$HAKOBU_TRANSFER_ID \$HAKOBU_EVENT \$HAKOBU_FILE_NAME \${HAKOBU_ERROR_CODE:--}" >>"$WORK/hooks/runs.log"
EOF
chmod 755 "$HOOK"
BROKER="broker:
  rabbitmq:
    urls: [ \"${URLS[0]}\", \"${URLS[1]}\", \"${URLS[2]}\" ]
    confirm_timeout: 10s
    verify_sender: false"
# The namespaces' private test subnet is not loopback: plain AMQP there
# must be allowed by name.
if [[ $NETNS != 0 ]]; then BROKER+="
    insecure: true"; fi
cat >"$WORK/alpha.yaml" <<EOF
node: $A
state_dir: $WORK/alpha/state
$BROKER
send:
  - file_id: SOAK
    outbox: $WORK/alpha/outbox
    to: [ $B ]
    ready: { stable_for: 300ms }
    on_success: [ "$HOOK" ]
    on_failure: [ "$HOOK" ]
EOF
cat >"$WORK/beta.yaml" <<EOF
node: $B
state_dir: $WORK/beta/state
$BROKER
receive:
  - file_id: SOAK
    from: [ $A ]
    inbox: $WORK/beta/inbox
    on_success: [ "$HOOK" ]
    on_failure: [ "$HOOK" ]
EOF

# In namespaces, alpha runs in endpoint a's and beta in b's, and so do
# their commands. A simple command put in the background is exec'd by the
# shell's child, and `ip netns exec` execs the agent: $! is the agent's pid.
IN_A=() IN_B=()
if [[ $NETNS != 0 ]]; then IN_A=(ip netns exec "$HKBP_ID-a") IN_B=(ip netns exec "$HKBP_ID-b"); fi
start_alpha() {
  HAKOBU_LOG=info,lapin=warn "${IN_A[@]}" "$BIN" run -c "$WORK/alpha.yaml" </dev/null >>"$WORK/alpha.log" 2>&1 &
  ALPHA_PID=$!
}
start_beta() {
  HAKOBU_LOG=info,lapin=warn "${IN_B[@]}" "$BIN" run -c "$WORK/beta.yaml" </dev/null >>"$WORK/beta.log" 2>&1 &
  BETA_PID=$!
}
kill9() { kill -9 "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# An agent that exits by itself (it should not, whatever the broker does) is
# a failure: counted, logged, and started again.
EXITS=0
check_alive() {
  if ! kill -0 "$ALPHA_PID" 2>/dev/null; then
    wait "$ALPHA_PID" 2>/dev/null || true
    EXITS=$((EXITS + 1)); log "alpha exited by itself; starting it again"; start_alpha
  fi
  if ! kill -0 "$BETA_PID" 2>/dev/null; then
    wait "$BETA_PID" 2>/dev/null || true
    EXITS=$((EXITS + 1)); log "beta exited by itself; starting it again"; start_beta
  fi
}

# --- the stream of files -------------------------------------------------------
MANIFEST=$WORK/manifest
: >"$MANIFEST"
dropper() {
  local i=0 name size tmp staged end=$1
  RANDOM=$((SEED + 1))
  while ((SECONDS < end)); do
    name=$(printf 'f%05d.bin' "$i")
    case $(rand 10) in
      0) size=0 ;;
      1) size=$(rand 1024) ;;
      *) size=$(rand $((5 * 1024 * 1024 + 1))) ;;
    esac
    staged=$WORK/stage/$name tmp=$WORK/alpha/outbox/.$name.tmp
    head -c "$size" /dev/urandom >"$staged"
    # The outbox's disk may be full (a fault): as a user's job would, try
    # again until the copy fits; only a whole copy is renamed in.
    until cp "$staged" "$tmp" 2>/dev/null; do
      rm -f "$tmp"
      ((SECONDS < end + 120)) || { log "the outbox stayed full"; return 1; }
      sleep 0.5
    done
    echo "$name $size $(sha256sum <"$staged" | cut -d' ' -f1)" >>"$MANIFEST"
    rm -f "$staged"
    mv "$tmp" "$WORK/alpha/outbox/$name"
    i=$((i + 1))
    rsleep 100 800
  done
}

# --- the faults ------------------------------------------------------------------
KILLS_NODE=0 KILLS_ALPHA=0 KILLS_BETA=0 HANGS_NODE=0 HANGS_AGENT=0 ALARMS=0 FULL_DISKS=0
CUTS_NODE=0 CUTS_AGENT=0 RESTARTS=0
# Node $1, resumed (pid $2) but not back in the cluster: restarted as an
# operator would, and the cluster waited for. Run in the node job.
restart_node() {
  echo "node $1 not back 90 s after SIGCONT: kill -9 and start" >>"$WORK/cluster.log"
  kill -9 "$2" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
  "$CLUSTER" start "$1" >>"$WORK/cluster.log" 2>&1 && whole_within 180
}
# The endpoints that partition faults cut apart (netns-cluster.sh's names).
peers_of() { local m; for m in n1 n2 n3 a b; do [[ $m == "$1" ]] || echo "$m"; done; }
# Fills the filesystem of directory $1 to the last byte (a ballast file as
# large as the free space, then what rounding left), for $2 ms; then empties it.
fill_for() {
  local ballast=$1/.soak-ballast
  fallocate -l "$(df -B1 --output=avail "$1" | tail -1)" "$ballast" 2>/dev/null || true
  cat /dev/zero >>"$ballast" 2>/dev/null || true
  rsleep "$2" "$2"
  rm -f "$ballast"
}
# The node fault's job is over: the node is back, or the soak fails.
node_back() {
  local rc=0
  wait "$NODE_JOB" || rc=$?
  case $rc in
    0) log "node $NODE_DOWN is back ($NODE_FAULT undone)" ;;
    3)
      RESTARTS=$((RESTARTS + 1))
      log "node $NODE_DOWN was not back in the cluster 90 s after SIGCONT; restarted (kill -9, start), now back"
      ;;
    *) die "node $NODE_DOWN: undoing the $NODE_FAULT failed (see $WORK/cluster.log)" ;;
  esac
  NODE_JOB='' NODE_DOWN='' NODE_FAULT='' NODE_PID=''
}
log "seed $SEED; $MINUTES min of faults; work directory $WORK"
start_beta
start_alpha
# An agent that cannot start (its configuration refused, say) ends the
# soak now, not after it.
sleep 2
for agent in alpha beta; do
  pid=ALPHA_PID; [[ $agent == beta ]] && pid=BETA_PID
  kill -0 "${!pid}" 2>/dev/null || die "$agent did not start: $(tail -n 3 "$WORK/$agent.log")"
done
END=$((SECONDS + MINUTES * 60))
dropper "$END" &
DROPPER_PID=$!
while ((SECONDS < END)); do
  rsleep 2000 6000
  ((SECONDS < END)) || break
  check_alive
  # The node fault undone in the background: done yet?
  if [[ -n $NODE_JOB ]] && ! kill -0 "$NODE_JOB" 2>/dev/null; then node_back; fi
  if [[ -n $FILL_JOB ]] && ! kill -0 "$FILL_JOB" 2>/dev/null; then
    wait "$FILL_JOB" || true
    FILL_JOB=''
  fi
  # 18 and 19, partitions, only in namespaces.
  if [[ $NETNS != 0 ]]; then fault=$(rand 20); else fault=$(rand 18); fi
  # One full disk at a time; none without the tmpfs mounts.
  if ((fault == 16 || fault == 17)) && [[ $DISK_FULL == 0 || -n $FILL_JOB ]]; then fault=$(rand 16); fi
  # One node or network fault at a time, and only once the cluster is whole again.
  node_fault=$((fault < 6 || fault >= 18))
  if ((node_fault)) && [[ -z $NODE_DOWN ]] && ! "$CLUSTER" status >/dev/null 2>&1; then fault=15; node_fault=0; fi
  if ((node_fault)) && [[ -n $NODE_DOWN ]]; then fault=$((6 + $(rand 10))); fi
  case $fault in
    0 | 1 | 2)
      n=$((1 + $(rand 3)))
      pid=$("$CLUSTER" pid "$n")
      log "kill -9 RabbitMQ node $n (pid $pid)"
      NODE_DOWN=$n NODE_FAULT=kill
      kill -9 "$pid"
      KILLS_NODE=$((KILLS_NODE + 1))
      (
        rsleep 2000 10000
        "$CLUSTER" start "$n" >>"$WORK/cluster.log" 2>&1
      ) &
      NODE_JOB=$!
      ;;
    3 | 4)
      n=$((1 + $(rand 3)))
      pid=$("$CLUSTER" pid "$n")
      t=$((3000 + $(rand 17000)))
      log "SIGSTOP RabbitMQ node $n (pid $pid) for $((t / 1000)) s"
      NODE_DOWN=$n NODE_FAULT=hang NODE_PID=$pid
      kill -STOP "$pid"
      HANGS_NODE=$((HANGS_NODE + 1))
      (
        rsleep "$t" "$t"
        kill -CONT "$pid"
        # Counted out and back (partition handling), or never left: whole
        # again; or restarted (exit 3: counted by the main loop).
        whole_within 90 && exit 0
        restart_node "$n" "$pid" && exit 3
        exit 1
      ) &
      NODE_JOB=$!
      ;;
    5)
      n=$((1 + $(rand 3)))
      t=$((2000 + $(rand 10000)))
      log "disk alarm on RabbitMQ node $n for $((t / 1000)) s"
      NODE_DOWN=$n NODE_FAULT=alarm
      "$CLUSTER" ctl "$n" set_disk_free_limit 1000000000000000 >>"$WORK/cluster.log" 2>&1 ||
        die "cannot raise a disk alarm on node $n (see $WORK/cluster.log)"
      ALARMS=$((ALARMS + 1))
      (
        rsleep "$t" "$t"
        "$CLUSTER" ctl "$n" set_disk_free_limit "$DISK_LIMIT" >>"$WORK/cluster.log" 2>&1
      ) &
      NODE_JOB=$!
      ;;
    6 | 7 | 8)
      log "kill -9 alpha (pid $ALPHA_PID)"
      kill9 "$ALPHA_PID"
      KILLS_ALPHA=$((KILLS_ALPHA + 1))
      rsleep 0 2000
      start_alpha
      ;;
    9 | 10 | 11)
      log "kill -9 beta (pid $BETA_PID)"
      kill9 "$BETA_PID"
      KILLS_BETA=$((KILLS_BETA + 1))
      rsleep 0 2000
      start_beta
      ;;
    12 | 13)
      log "SIGSTOP alpha (pid $ALPHA_PID)"
      kill -STOP "$ALPHA_PID"
      HANGS_AGENT=$((HANGS_AGENT + 1))
      rsleep 1000 8000
      kill -CONT "$ALPHA_PID"
      ;;
    18 | 19)
      t=$((3000 + $(rand 17000)))
      if ((fault == 18)); then
        # A node cut off from everyone: it pauses (the minority), the
        # other two carry on; the agents connected to it move on.
        n=$((1 + $(rand 3)))
        log "partition: RabbitMQ node $n cut off from the other nodes and both agents for $((t / 1000)) s"
        for m in $(peers_of "n$n"); do "$CLUSTER" cut "n$n" "$m" >>"$WORK/cluster.log" 2>&1; done
        CUTS_NODE=$((CUTS_NODE + 1))
      else
        # One agent cut off from one node (the one it uses, or another).
        n=$((1 + $(rand 3))) e=$([[ $(rand 2) == 0 ]] && echo a || echo b)
        log "partition: agent $e cut off from RabbitMQ node $n for $((t / 1000)) s"
        "$CLUSTER" cut "$e" "n$n" >>"$WORK/cluster.log" 2>&1
        CUTS_AGENT=$((CUTS_AGENT + 1))
      fi
      NODE_DOWN=$n NODE_FAULT=cut
      (
        rsleep "$t" "$t"
        "$CLUSTER" heal-all >>"$WORK/cluster.log" 2>&1
        whole_within 180
      ) &
      NODE_JOB=$!
      ;;
    16 | 17)
      d=${FULL_DIRS[fault - 16]}
      t=$((2000 + $(rand 10000)))
      log "disk full: ${d#"$WORK"/} for $((t / 1000)) s"
      FULL_DISKS=$((FULL_DISKS + 1))
      fill_for "$d" "$t" &
      FILL_JOB=$!
      ;;
    *)
      log "SIGSTOP beta (pid $BETA_PID)"
      kill -STOP "$BETA_PID"
      HANGS_AGENT=$((HANGS_AGENT + 1))
      rsleep 1000 8000
      kill -CONT "$BETA_PID"
      ;;
  esac
done
wait "$DROPPER_PID" || die "the dropper failed"
DROPPER_PID=''
if [[ -n $FILL_JOB ]]; then wait "$FILL_JOB" || true; FILL_JOB=''; fi
if [[ -n $NODE_JOB ]]; then node_back; fi
check_alive
FILES=$(wc -l <"$MANIFEST")
FAULTS=$((KILLS_NODE + KILLS_ALPHA + KILLS_BETA + HANGS_NODE + HANGS_AGENT + ALARMS + FULL_DISKS + CUTS_NODE + CUTS_AGENT))
log "faults over: $FILES files dropped; $KILLS_NODE node, $KILLS_ALPHA alpha and $KILLS_BETA beta kills; $HANGS_NODE node and $HANGS_AGENT agent hangs ($RESTARTS nodes restarted after their hang); $ALARMS disk alarms; $FULL_DISKS full disks; $CUTS_NODE nodes and $CUTS_AGENT agents cut off"

# --- quiescence --------------------------------------------------------------
hist() {
  local in=("${IN_A[@]}")
  [[ $1 == beta ]] && in=("${IN_B[@]}")
  "${in[@]}" "$BIN" history -c "$WORK/$1.yaml" --limit 1000000 --json </dev/null
}
# The value of string field $2 in the JSON line $1 (history lines are flat,
# and the names and ids this script uses need no escaping).
field() { sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p" <<<"$1"; }
UNSETTLED='"status":"(queued|sending|awaiting_receipt|receiving|placing|hook_running)"'
"$CLUSTER" status >/dev/null 2>&1 || log "waiting for the cluster to be whole again"
quiet_from=$SECONDS
deadline=$((SECONDS + QUIESCE))
until "$CLUSTER" status >/dev/null 2>&1; do
  ((SECONDS < deadline)) || die "the cluster is not healthy: $("$CLUSTER" status 2>&1)"
  sleep 1
done
while :; do
  check_alive
  ha=$(hist alpha) hb=$(hist beta)
  rows=$(grep -c . <<<"$ha" || true)
  pending=$(printf '%s\n%s\n' "$ha" "$hb" | grep -cE "$UNSETTLED" || true)
  left=$(find "$WORK/alpha/outbox" -type f | wc -l)
  if ((rows >= FILES && pending == 0 && left == 0)); then break; fi
  if ((SECONDS >= deadline)); then
    log "no quiescence after ${QUIESCE}s: $rows of $FILES transfers recorded, $pending unsettled, $left in the outbox"
    break
  fi
  sleep 2
done
log "quiet after $((SECONDS - quiet_from)) s"

# --- the check -------------------------------------------------------------------
RUNS=$WORK/hooks/runs.log
touch "$RUNS"
runs_of() { grep -c "^$1 $2 " "$RUNS" || true; }
lost=0 corrupted=0 dup=0 outside=0 failed=0 missed=0 reruns=0 interrupted=0
while read -r name size sha; do
  f=$WORK/beta/inbox/$name
  if [[ ! -f $f ]]; then
    lost=$((lost + 1)); log "lost: $name ($size bytes)"
  elif [[ $(sha256sum <"$f" | cut -d' ' -f1) != "$sha" ]]; then
    corrupted=$((corrupted + 1)); log "corrupted: $name"
  fi
  rx=$(grep -F "\"file_name\":\"$name\"" <<<"$hb" || true)
  tx=$(grep -F "\"file_name\":\"$name\"" <<<"$ha" || true)
  [[ $(grep -c . <<<"$tx") -le 1 ]] || { failed=$((failed + 1)); log "$name was sent as more than one transfer"; }
  st=$(field "$tx" status) code=$(field "$tx" error_code)
  case $st in
    sent | hook_interrupted) ;; # hook_interrupted here: alpha's own hook was cut off
    send_failed) [[ $code == hook_interrupted ]] || { failed=$((failed + 1)); log "$name: send_failed ($code)"; } ;;
    *) failed=$((failed + 1)); log "$name: alpha status '${st:-none}'" ;;
  esac
  n=0
  for tid in $(field "$rx" transfer_id); do
    k=$(runs_of "$tid" received)
    if [[ $k -eq 0 && $(field "$(grep -F "\"transfer_id\":\"$tid\"" <<<"$rx")" status) == hook_interrupted ]]; then
      interrupted=$((interrupted + 1))
      log "$name: beta was killed before its hook ran (hook_interrupted): hakobu rerun $tid"
      "${IN_B[@]}" "$BIN" rerun -c "$WORK/beta.yaml" "$tid" </dev/null >>"$WORK/rerun.log" 2>&1 || log "rerun $tid failed"
      reruns=$((reruns + 1))
      k=$(runs_of "$tid" received)
    elif [[ $(field "$(grep -F "\"transfer_id\":\"$tid\"" <<<"$rx")" status) == hook_interrupted ]]; then
      interrupted=$((interrupted + 1))
    fi
    n=$((n + k))
  done
  if [[ $n -eq 0 ]]; then
    missed=$((missed + 1)); log "success hook never ran for $name"
  elif [[ $n -gt 1 ]]; then
    dup=$((dup + n - 1)); log "success hook ran $n times for $name"
  fi
done <"$MANIFEST"
# Sender hooks: at most once per transfer and event.
while read -r count tid event; do
  if [[ $event == sent || $event == send_failed ]] && ((count > 1)); then
    dup=$((dup + count - 1)); log "sender hook $event ran $count times for $tid"
  fi
done < <(cut -d' ' -f1,2 "$RUNS" | sort | uniq -c)
# Nothing stray under an inbox name, nothing partial left.
while read -r f; do
  name=$(basename "$f")
  if ! grep -q "^$name " "$MANIFEST"; then
    corrupted=$((corrupted + 1)); log "stray file in the inbox: $f"
  fi
done < <(find "$WORK/beta/inbox" -mindepth 1 -maxdepth 1 -type f ! -name '.*')
while read -r f; do
  outside=$((outside + 1)); log "left behind: $f"
done < <(find "$WORK/beta/inbox" -mindepth 1 -path "$WORK/beta/inbox/.hakobu-partial/*")
# Nothing anywhere else but the agents' state, the inbox, hooks, logs.
while read -r f; do
  outside=$((outside + 1)); log "write outside the inbox: $f"
done < <(find "$WORK" -type f ! -path "$WORK/alpha/state/*" ! -path "$WORK/beta/state/*" \
  ! -path "$WORK/beta/inbox/*" ! -path "$WORK/hooks/*" ! -path "$WORK/rmq/*" \
  ! -name '*.yaml' ! -name '*.log' ! -name manifest)

log "seed $SEED: $KILLS_NODE node, $KILLS_ALPHA alpha, $KILLS_BETA beta kills; $FULL_DISKS full disks; $CUTS_NODE + $CUTS_AGENT partitions; $RESTARTS nodes restarted after a hang; $interrupted hooks interrupted ($reruns re-run by hand); $failed transfers failed, $EXITS agent exits"
echo "soak: $FAULTS faults injected, $FILES files, $lost lost, $corrupted corrupted, $dup duplicate hooks, $missed missed hooks, $outside writes outside inbox"
if ((lost + corrupted + dup + outside + failed + missed + EXITS == 0)); then RESULT=0; else
  log "FAILED; last lines of the agents' logs:"
  tail -n 20 "$WORK/alpha.log" "$WORK/beta.log" >&2 || true
fi
exit "$RESULT"
