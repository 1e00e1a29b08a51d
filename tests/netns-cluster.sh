#!/usr/bin/env bash
# tests/netns-cluster.sh — a three-node RabbitMQ cluster whose nodes, and the
# agents under test, each live in a network namespace of their own, joined by
# a router namespace, so that a test can cut the network between any two of
# them and heal it again (tests/partition.rs).
#
# The network exists only inside namespaces this script creates: a private
# subnet (10.213.77.0/24) on veth pairs whose both ends are created directly
# inside the namespaces (`ip -n`), so the root namespace's links, routes and
# firewall are never touched, and no namespace has a route beyond the subnet
# and its own loopback. Every name starts with $HKBP_ID (e.g. hkbp-1234), the
# namespaces are `$HKBP_ID-sw` (the router) and `$HKBP_ID-{n1,n2,n3,a,b,c}`.
#
#   router ($ID-sw, forwarding)   10.213.77.1 on each of its veths
#     n1 10.213.77.11   n2 .12   n3 .13     RabbitMQ nodes (each with its own epmd)
#     a  10.213.77.21   b  .22   c  .23     agents
#
# A cut is a pair of `blackhole` policy rules in the router (`ip rule`): packets
# between the two addresses are dropped in silence, as a failed switch drops
# them (no reset, no ICMP); a heal deletes the rules. Nothing else changes.
#
# Usage (as root; HKBP_ID and HKBP_BASE in the environment):
#   netns-cluster.sh up                 namespaces, links, three nodes clustered, the
#                                       user; prints the three AMQP URLs
#   netns-cluster.sh down               nodes and epmds stopped by pid, every process
#                                       left in our namespaces killed by pid, the
#                                       namespaces deleted (their veths with them)
#   netns-cluster.sh cut X Y | heal X Y drop / pass traffic between endpoints X and Y
#   netns-cluster.sh heal-all           delete every cut
#   netns-cluster.sh sweep              remove namespaces left by a killed run (`up` does
#                                       it too): hkbp-PID-* whose PID is gone
#   netns-cluster.sh ns X               the namespace's name (for `ip netns exec`)
#   netns-cluster.sh ctl N ARGS...      rabbitmqctl on node N, run inside its namespace
#   netns-cluster.sh leader QUEUE [N..] 1..3: the node leading QUEUE, as the first of
#                                       nodes N.. (default 1 2 3) that answers sees it
#   netns-cluster.sh status             0 when all three nodes run, see each other
#                                       and report no partition
#   netns-cluster.sh pid N              the OS pid of node N
#   netns-cluster.sh start N            node N started again (after a kill -9), waited
#                                       for until it runs; it rejoins the cluster itself
# Endpoints: n1 n2 n3 a b c.
#
# RabbitMQ's partition handling is pause_minority, as RabbitMQ's clustering
# and partitions guide recommends for clusters of three or more nodes where
# consistency comes first: the nodes on the minority side pause (close their
# listeners and client connections) until the partition ends, so no client can
# publish into a side that cannot replicate, there is no split brain to heal,
# and quorum queues keep working on the majority side (Raft elects a leader
# there). autoheal instead lets both sides run and restarts the losers on
# heal, and ignore leaves the cluster split for good.
set -euo pipefail

usage() { echo "usage: $0 up|down|cut X Y|heal X Y|heal-all|sweep|ns X|ctl N ARGS...|leader QUEUE|status|pid N|start N" >&2; exit 2; }
[[ $# -ge 1 ]] || usage

ID=${HKBP_ID:?set HKBP_ID, a unique prefix such as hkbp-\$\$}
BASE=${HKBP_BASE:?set HKBP_BASE, a directory for the nodes\' data}
BIN=${HAKOBU_RMQ_BIN:-/usr/lib/rabbitmq/bin}
TIMEOUT=${HAKOBU_RMQ_TIMEOUT:-120}
NET=10.213.77
ENDPOINTS=(n1 n2 n3 a b c)
[[ $ID =~ ^hkbp-[A-Za-z0-9-]{1,20}$ ]] || { echo "HKBP_ID must look like hkbp-1234, got '$ID'" >&2; exit 2; }

log() { printf 'netns-cluster [%2ds]: %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }

addr() {
  case $1 in
    n1) echo "$NET.11" ;; n2) echo "$NET.12" ;; n3) echo "$NET.13" ;;
    a) echo "$NET.21" ;; b) echo "$NET.22" ;; c) echo "$NET.23" ;;
    *) die "unknown endpoint '$1' (one of ${ENDPOINTS[*]})" ;;
  esac
}
ns() { addr "$1" >/dev/null; echo "$ID-$1"; }
SW=$ID-sw
node() { echo "part$1@$(addr "n$1")"; }
ndir() { echo "$BASE/node$1"; }
pidfile() { echo "$BASE/node$1/rabbit.pid"; }
check_n() { [[ ${1:-} =~ ^[123]$ ]] || die "node number must be 1, 2 or 3, got '${1:-}'"; }

mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd)
export HOME=$BASE/home
export LANG=C.UTF-8 LC_ALL=C.UTF-8
export RABBITMQ_USE_LONGNAME=true
export RABBITMQ_CONF_ENV_FILE=$BASE/rabbitmq-env.conf
unset RABBITMQ_NODENAME RABBITMQ_NODE_PORT RABBITMQ_CONFIG_FILE RABBITMQ_CONFIG_FILES ERL_EPMD_ADDRESS

# rabbitmqctl on node N from inside N's namespace (which reaches it even when
# N is cut off from everyone else).
ctl() {
  local i=$1; shift
  ip netns exec "$(ns "n$i")" timeout 30 "$BIN/rabbitmqctl" -q -n "$(node "$i")" "$@" </dev/null
}

alive() { kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

node_pid() {
  local pf pid
  pf=$(pidfile "$1")
  [[ -s $pf ]] || return 1
  pid=$(tr -dc 0-9 <"$pf")
  [[ -n $pid ]] && alive "$pid" || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$(node "$1")" || return 1
  echo "$pid"
}

preflight() {
  [[ $(id -u) -eq 0 ]] || die "network namespaces need root (ip netns add); run the partition suite as root"
  command -v ip >/dev/null || die "no 'ip' command: apt-get install iproute2"
  command -v epmd >/dev/null || die "no epmd: apt-get install rabbitmq-server"
  [[ -x $BIN/rabbitmq-server ]] || die "$BIN/rabbitmq-server not found (apt-get install rabbitmq-server)"
  sweep
  local e
  for e in sw "${ENDPOINTS[@]}"; do
    if ip netns list | grep -q "^$ID-$e\b"; then die "namespace $ID-$e exists already (run down first)"; fi
  done
}

make_network() {
  local e i=0
  ip netns add "$SW" || die "cannot create a network namespace (ip netns add $SW)"
  ip -n "$SW" link set lo up
  ip netns exec "$SW" sysctl -qw net.ipv4.ip_forward=1
  for e in "${ENDPOINTS[@]}"; do
    ip netns add "$(ns "$e")"
    ip -n "$(ns "$e")" link set lo up
    # Both ends made inside namespaces: eth0 at the endpoint, to-E at the router.
    ip -n "$SW" link add name "to-$e" type veth peer name eth0 netns "$(ns "$e")"
    ip -n "$SW" addr add "$NET.1/32" dev "to-$e"
    ip -n "$SW" link set "to-$e" up
    ip -n "$SW" route add "$(addr "$e")/32" dev "to-$e"
    ip -n "$(ns "$e")" addr add "$(addr "$e")/32" dev eth0
    ip -n "$(ns "$e")" link set eth0 up
    # The subnet only: no default route, nothing beyond it is reachable.
    ip -n "$(ns "$e")" route add "$NET.0/24" via "$NET.1" dev eth0 onlink
    i=$((i + 1))
  done
  log "network up: router $SW, $i endpoints on $NET.0/24"
}

write_files() {
  local i=$1 d
  d=$(ndir "$i")
  mkdir -p "$d/mnesia" "$d/log" "$HOME"
  chmod 700 "$HOME"
  if [[ ! -s $HOME/.erlang.cookie ]]; then
    (umask 077 && od -An -N20 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F >"$HOME/.erlang.cookie")
  fi
  chmod 400 "$HOME/.erlang.cookie"
  [[ -f $RABBITMQ_CONF_ENV_FILE ]] || : >"$RABBITMQ_CONF_ENV_FILE"
  echo '[].' >"$BASE/enabled_plugins"
  cat >"$d/rabbitmq.conf" <<EOF
# written by netns-cluster.sh
listeners.tcp.default = $(addr "n$i"):5672
loopback_users = none
raft.segment_max_entries = 256
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
# A peer that stops answering is counted out after net_ticktime +-25 %.
net_ticktime = 15
# See the header: the minority pauses, the majority carries on.
cluster_partition_handling = pause_minority
EOF
}

launch() {
  local i=$1 d n a
  d=$(ndir "$i")
  n=$(node "$i")
  a=$(addr "n$i")
  write_files "$i"
  rm -f "$(pidfile "$i")"
  # Its own epmd, on the namespace's addresses only, so that its pid is
  # known; a node started again finds its epmd still there.
  if ! { [[ -s $d/epmd.pid ]] && alive "$(tr -dc 0-9 <"$d/epmd.pid")"; }; then
    ip netns exec "$(ns "n$i")" setsid epmd -address "127.0.0.1,$a" </dev/null >>"$d/log/epmd.log" 2>&1 &
    echo $! >"$d/epmd.pid"
  fi
  for _ in $(seq 50); do
    ip netns exec "$(ns "n$i")" epmd -names >/dev/null 2>&1 && break
    sleep 0.1
  done
  log "starting $n"
  ip netns exec "$(ns "n$i")" env RABBITMQ_NODENAME="$n" \
    RABBITMQ_NODE_IP_ADDRESS="$a" \
    RABBITMQ_NODE_PORT=5672 \
    RABBITMQ_DIST_PORT=25672 \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$(pidfile "$i")" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-hakobu_rmq_node $n" \
    "$BIN/rabbitmq-server" -detached </dev/null >>"$d/log/start.log" 2>&1
}

await_node() {
  local i=$1 n deadline
  n=$(node "$i")
  deadline=$((SECONDS + TIMEOUT))
  until ip netns exec "$(ns "n$i")" "$BIN/rabbitmq-diagnostics" -q -n "$n" check_running </dev/null >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      tail -n 20 "$(ndir "$i")/log/$n.log" >&2 2>/dev/null || true
      tail -n 20 "$(ndir "$i")/log/start.log" >&2 2>/dev/null || true
      die "$n did not boot within ${TIMEOUT}s (logs in $(ndir "$i")/log)"
    fi
    sleep 0.5
  done
  log "$n is running (pid $(node_pid "$i" || echo '?'))"
}

ctl_logged() {
  local out=$BASE/ctl.log
  echo "+ rabbitmqctl -n $(node "$1") ${*:2}" >>"$out"
  ctl "$@" >>"$out" 2>&1 || { tail -n 30 "$out" >&2; die "rabbitmqctl -n $(node "$1") ${*:2} failed (see $out)"; }
}

cmd_up() {
  local i
  preflight
  make_network
  for i in 1 2 3; do launch "$i"; done
  for i in 1 2 3; do await_node "$i"; done
  for i in 2 3; do
    ctl_logged "$i" stop_app
    ctl_logged "$i" join_cluster "$(node 1)"
    ctl_logged "$i" start_app
    await_node "$i"
  done
  ctl_logged 1 add_user hakobu secret
  ctl_logged 1 set_permissions -p / hakobu '.*' '.*' '.*'
  ctl_logged 1 set_user_tags hakobu administrator
  ctl_logged 1 delete_user guest
  log "cluster up in ${SECONDS}s"
  for i in 1 2 3; do echo "amqp://hakobu:secret@$(addr "n$i"):5672/%2f"; done
}

# Namespaces left by a run that was killed before its guard ran
# (hkbp-PID-..., PID no longer alive): every process in them killed by pid,
# then deleted. Only names of this script's pattern are looked at.
sweep() {
  local name owner pid
  for name in $(ip netns list | awk '{print $1}' | grep -E '^hkbp-[0-9]+-(sw|n1|n2|n3|a|b|c)$' || true); do
    owner=${name#hkbp-}
    owner=${owner%%-*}
    [[ -d /proc/$owner ]] && continue
    log "removing $name, left by process $owner which is gone"
    for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do [[ -z $(ip netns pids "$name" 2>/dev/null) ]] && break; sleep 0.1; done
    ip netns del "$name" || log "could not delete namespace $name"
  done
}

cmd_down() {
  local i pid e p pids=()
  for i in 1 2 3; do
    if pid=$(node_pid "$i"); then kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; pids+=("$pid"); fi
  done
  for _ in $(seq 150); do
    local still=0
    for pid in ${pids[@]+"${pids[@]}"}; do alive "$pid" && still=1; done
    ((still)) || break
    sleep 0.1
  done
  # Whatever is left in our namespaces (epmds, a node that did not stop,
  # agents, hooks) is ours: killed by pid.
  for e in "${ENDPOINTS[@]}" sw; do
    p=$ID-$e
    ip netns list | grep -q "^$p\b" || continue
    for pid in $(ip netns pids "$p" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done
  for e in "${ENDPOINTS[@]}" sw; do
    p=$ID-$e
    ip netns list | grep -q "^$p\b" || continue
    for _ in $(seq 50); do [[ -z $(ip netns pids "$p" 2>/dev/null) ]] && break; sleep 0.1; done
    ip netns del "$p" || log "could not delete namespace $p"
  done
  log "down"
}

rule() {
  local op=$1 x y
  x=$(addr "$2")
  y=$(addr "$3")
  [[ $x != "$y" ]] || die "cannot cut $2 from itself"
  if [[ $op == add ]]; then
    ip -n "$SW" rule add from "$x" to "$y" blackhole
    ip -n "$SW" rule add from "$y" to "$x" blackhole
  else
    while ip -n "$SW" rule del from "$x" to "$y" blackhole 2>/dev/null; do :; done
    while ip -n "$SW" rule del from "$y" to "$x" blackhole 2>/dev/null; do :; done
  fi
}

cmd_heal_all() {
  local e f
  for e in "${ENDPOINTS[@]}"; do
    for f in "${ENDPOINTS[@]}"; do [[ $e == "$f" ]] || rule del "$e" "$f"; done
  done
}

# The leader of queue $1 as nodes ${@:2} (default 1 2 3) see it, asking each
# in turn until one answers: the leader its own Raft member knows (the queue's
# record lags behind an election while the old leader is cut off). Through
# `eval` on that node: list_queues gathers from every node, which must reach
# the CLI's own node by its host name, a name that means nothing inside these
# namespaces.
cmd_leader() {
  local q=$1 i j leader asked=("${@:2}")
  [[ $q =~ ^[A-Za-z0-9._-]+$ ]] || die "'$q' is not a queue name this script looks up"
  [[ ${#asked[@]} -gt 0 ]] || asked=(1 2 3)
  for i in "${asked[@]}"; do
    check_n "$i"
    leader=$(ctl "$i" eval "{ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"$q\">>)), {N, _} = amqqueue:get_pid(Q), {ok, _, {_, L}} = ra:members({N, node()}), L." 2>/dev/null) || continue
    leader=$(tr -d "' \n" <<<"$leader")
    for j in 1 2 3; do
      if [[ $leader == "$(node "$j")" ]]; then echo "$j"; return 0; fi
    done
  done
  die "no leader for queue '$q' seen from nodes ${asked[*]}"
}

cmd_status() {
  local i out
  for i in 1 2 3; do node_pid "$i" >/dev/null || { echo "$(node "$i") stopped"; return 1; }; done
  for i in 1 2 3; do
    out=$(ctl "$i" eval 'lists:flatten(io_lib:format("~w;~w", [lists:sort(rabbit_nodes:all_running()), rabbit_node_monitor:partitions()])).' 2>/dev/null) || {
      echo "$(node "$i") not answering"
      return 1
    }
    out=$(tr -d "\"' \n" <<<"$out")
    echo "$(node "$i"): $out"
    [[ $out == *"$(node 1),$(node 2),$(node 3)];[]" ]] || return 1
  done
}

case $1 in
  up) cmd_up ;;
  down) cmd_down ;;
  cut) [[ $# -eq 3 ]] || usage; rule add "$2" "$3" ;;
  heal) [[ $# -eq 3 ]] || usage; rule del "$2" "$3" ;;
  heal-all) cmd_heal_all ;;
  sweep) sweep ;;
  ns) [[ $# -eq 2 ]] || usage; ns "$2" ;;
  ctl) check_n "${2:-}"; i=$2; shift 2; ctl "$i" "$@" ;;
  leader) [[ $# -ge 2 ]] || usage; shift; cmd_leader "$@" ;;
  status) cmd_status ;;
  pid) check_n "${2:-}"; node_pid "$2" || die "$(node "$2") is not running" ;;
  start)
    check_n "${2:-}"
    if node_pid "$2" >/dev/null; then die "$(node "$2") is running already"; fi
    launch "$2"
    await_node "$2"
    ;;
  *) usage ;;
esac
