#!/usr/bin/env bash
# local-cluster.sh — a throwaway three-node RabbitMQ cluster on loopback, for
# hakobu's tests and for trying the `rabbitmq` broker on one machine.
#
# Owns everything under $HAKOBU_RMQ_BASE: the nodes' data, logs, pid files and
# configuration, the shared Erlang cookie ($BASE/home/.erlang.cookie) and, when
# no epmd was running, the epmd it started. It never touches a system-wide
# RabbitMQ (/etc/rabbitmq, /var/lib/rabbitmq) and never kills by name: only pids
# from its own pid files, after checking that the process is the node it
# expects.
#
# Usage: local-cluster.sh up|down|status|urls|tls-urls
#        local-cluster.sh pid N | start N | stop N        (N = 1, 2 or 3)
#        local-cluster.sh ctl N ARGS...   rabbitmqctl ARGS on node N (e.g.
#                                         set_disk_free_limit, to raise and
#                                         clear a resource alarm at run time)
#        local-cluster.sh leader QUEUE    the number (1..3) of the node that
#                                         leads quorum queue QUEUE in the vhost
#        local-cluster.sh user NODE...    a RabbitMQ user per hakobu node, with
#                                         the narrowest permissions (below);
#                                         prints each password file's path
#
# Users: HAKOBU_RMQ_USER is the administrator (full rights, for tests and
# operators). Every hakobu node gets a user of its own, named after it, so
# that the broker checks `user_id` against the node's name and peers can
# verify the sender (`verify_sender`, on by default). A node's permissions in
# the vhost (regular expressions; a `.` in a node name is escaped):
#   configure  ^hakobu\.(node\.NODE|dead-letter)$   declare its own queue and the dead-letter queue
#   write      ^amq\.default$                       publish through the default exchange (to any
#                                                   node's queue); dead-letter through it
#   read       ^hakobu\.node\.NODE$                 consume its own queue, and no other
# Passwords are random, written once (0600) to $HAKOBU_RMQ_SECRETS/NODE.password
# and given to agents with `password_file:`; users are created with
# `rabbitmqctl import_definitions` (salted SHA-256 hashes), so no password is
# ever on a command line.
#
# Environment (defaults in brackets):
#   HAKOBU_RMQ_NAME        node name prefix [rabbit] -> rabbit1@localhost ...
#   HAKOBU_RMQ_BASE        state directory [${TMPDIR:-/tmp}/hakobu-rmq]
#   HAKOBU_RMQ_PORTS       three AMQP ports ["5672 5673 5674"]
#   HAKOBU_RMQ_DIST_PORTS  three Erlang distribution ports [AMQP port + 20000]
#   HAKOBU_RMQ_USER/PASS   user created with full rights [hakobu/secret]
#   HAKOBU_RMQ_VHOST       vhost for that user, created if missing [/]
#   HAKOBU_RMQ_TIMEOUT     seconds to wait for a node to boot [120]
#   HAKOBU_RMQ_BIN         RabbitMQ scripts [/usr/lib/rabbitmq/bin]
#   HAKOBU_RMQ_NODES       hakobu nodes that get a user at `up` ["alpha beta"]
#   HAKOBU_RMQ_SECRETS     their password files [$HAKOBU_RMQ_BASE/secrets]
#   HAKOBU_RMQ_TLS_DIR     if set, TLS listeners too: the directory holds ca.pem,
#                          server.pem and server.key (tests/run.sh makes them);
#                          clients must present a certificate the CA signed,
#                          and may log in with it (SASL EXTERNAL, user = its CN)
#   HAKOBU_RMQ_TLS_PORTS   three amqps ports [AMQP port + 1000]
# Two clusters can run side by side given distinct NAME, PORTS and BASE. They
# share one epmd (port 4369): if none runs, `up` starts one on 127.0.0.1 and
# records its pid in ${TMPDIR:-/tmp}/hakobu-rmq-epmd.pid; `down` stops that
# epmd once no node is registered with it. Another epmd (e.g. systemd's
# epmd.socket) is used as is and never stopped.
#
# No plugins are enabled (enabled_plugins is `[].`, or only
# rabbitmq_auth_mechanism_ssl with TLS), so there is no management or
# prometheus port to clash. `up` prints the AMQP URLs on stdout, one a line;
# progress goes to stderr.
set -euo pipefail

usage() { echo "usage: $0 up|down|status|urls|tls-urls|pid N|start N|stop N|ctl N ARGS...|leader QUEUE|user NODE..." >&2; exit 2; }
case ${1:-} in up | down | status | urls | tls-urls | pid | start | stop | ctl | leader | user) ;; *) usage ;; esac

NAME=${HAKOBU_RMQ_NAME:-rabbit}
BASE=${HAKOBU_RMQ_BASE:-${TMPDIR:-/tmp}/hakobu-rmq}
RMQ_USER=${HAKOBU_RMQ_USER:-hakobu}
RMQ_PASS=${HAKOBU_RMQ_PASS:-secret}
VHOST=${HAKOBU_RMQ_VHOST:-/}
TIMEOUT=${HAKOBU_RMQ_TIMEOUT:-120}
BIN=${HAKOBU_RMQ_BIN:-/usr/lib/rabbitmq/bin}
PORTS_SPEC=${HAKOBU_RMQ_PORTS:-5672 5673 5674}
read -r -a PORTS <<<"${PORTS_SPEC//,/ }"

log() { printf 'local-cluster [%2ds]: %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ ${#PORTS[@]} -eq 3 ]] || die "HAKOBU_RMQ_PORTS must hold three ports, got '${PORTS[*]}'"
if [[ -n ${HAKOBU_RMQ_DIST_PORTS:-} ]]; then
  read -r -a DIST_PORTS <<<"${HAKOBU_RMQ_DIST_PORTS//,/ }"
  [[ ${#DIST_PORTS[@]} -eq 3 ]] || die "HAKOBU_RMQ_DIST_PORTS must hold three ports"
else
  DIST_PORTS=($((PORTS[0] + 20000)) $((PORTS[1] + 20000)) $((PORTS[2] + 20000)))
fi
[[ $NAME =~ ^[A-Za-z][A-Za-z0-9_-]*$ ]] || die "HAKOBU_RMQ_NAME must be a plain name, got '$NAME'"
if [[ -n ${HAKOBU_RMQ_TLS_PORTS:-} ]]; then
  read -r -a TLS_PORTS <<<"${HAKOBU_RMQ_TLS_PORTS//,/ }"
  [[ ${#TLS_PORTS[@]} -eq 3 ]] || die "HAKOBU_RMQ_TLS_PORTS must hold three ports"
else
  TLS_PORTS=($((PORTS[0] + 1000)) $((PORTS[1] + 1000)) $((PORTS[2] + 1000)))
fi
TLS_DIR=${HAKOBU_RMQ_TLS_DIR:-}
NODES=${HAKOBU_RMQ_NODES-alpha beta}

EPMD_PIDFILE=${TMPDIR:-/tmp}/hakobu-rmq-epmd.pid
mkdir -p "$BASE"
BASE=$(cd "$BASE" && pwd) # absolute: RabbitMQ resolves paths from its own cwd
SECRETS=${HAKOBU_RMQ_SECRETS:-$BASE/secrets}
if [[ -n $TLS_DIR ]]; then
  TLS_DIR=$(cd "$TLS_DIR" && pwd) || die "HAKOBU_RMQ_TLS_DIR '$HAKOBU_RMQ_TLS_DIR' is not a directory"
  for f in ca.pem server.pem server.key; do
    [[ -r $TLS_DIR/$f ]] || die "HAKOBU_RMQ_TLS_DIR lacks $f"
  done
fi

# Environment shared by the servers and by rabbitmqctl: the same HOME (hence
# the same cookie), epmd and distribution on loopback only, and no
# /etc/rabbitmq/rabbitmq-env.conf.
export HOME=$BASE/home
export LANG=C.UTF-8 LC_ALL=C.UTF-8
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_CONF_ENV_FILE=$BASE/rabbitmq-env.conf
export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
unset RABBITMQ_NODENAME RABBITMQ_NODE_PORT RABBITMQ_CONFIG_FILE RABBITMQ_CONFIG_FILES

node() { echo "$NAME$1@localhost"; }
ndir() { echo "$BASE/node$1"; }
pidfile() { echo "$BASE/node$1/rabbit.pid"; }
ctl() { local i=$1; shift; "$BIN/rabbitmqctl" -q -n "$(node "$i")" "$@" </dev/null; }
# rabbitmqctl with its chatter (3.10 prints server-side warnings while joining)
# kept in BASE/ctl.log, shown only on failure.
ctl_logged() {
  local out=$BASE/ctl.log shown=${*:2}
  shown=${shown//"$RMQ_PASS"/***}
  echo "+ rabbitmqctl -n $(node "$1") $shown" >>"$out"
  if ! ctl "$@" >>"$out" 2>&1; then
    tail -n 30 "$out" >&2
    die "rabbitmqctl -n $(node "$1") $shown failed (see $out)"
  fi
}
check_n() { [[ ${1:-} =~ ^[123]$ ]] || die "node number must be 1, 2 or 3, got '${1:-}'"; }

# The OS pid of node N if it is alive and really is that node: its command
# line carries our marker with the node name, and (when readable) its
# environment names our pid file.
node_pid() {
  local i=$1 pf pid
  pf=$(pidfile "$i")
  [[ -s $pf ]] || return 1
  pid=$(tr -dc 0-9 <"$pf")
  [[ -n $pid ]] && alive "$pid" || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$(node "$i")" || return 1
  if [[ -r /proc/$pid/environ ]]; then
    tr '\0' '\n' <"/proc/$pid/environ" | grep -qxF -- "RABBITMQ_PID_FILE=$pf" || return 1
  fi
  echo "$pid"
}

# Alive and not a zombie waiting to be reaped.
alive() {
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st=$(sed -n 's/^[0-9]* (.*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 0
  [[ $st != Z ]]
}

# True if something still listens on 127.0.0.1:PORT after up to 5 s (a node
# just killed with -9 can hold its ports for a moment).
port_busy() {
  local _
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 1
    sleep 0.1
  done
}

# epmd: if none is running, start one on loopback and record its pid in a
# file shared by all clusters of this script ($EPMD_PIDFILE), so that whichever
# `down` leaves it with no registered node stops it, even when two clusters
# ran side by side. An epmd this script did not start is never stopped.
is_our_epmd() {
  [[ -n $1 ]] && alive "$1" &&
    [[ $(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) == "epmd -address 127.0.0.1 " ]]
}

ensure_epmd() {
  if epmd -names >/dev/null 2>&1; then return 0; fi
  log "starting epmd on 127.0.0.1:4369"
  setsid epmd -address 127.0.0.1 </dev/null >>"$BASE/epmd.log" 2>&1 &
  local pid=$!
  for _ in $(seq 50); do
    epmd -names >/dev/null 2>&1 && break
    sleep 0.1
  done
  epmd -names >/dev/null 2>&1 || die "epmd did not start (see $BASE/epmd.log)"
  # Record it only if ours is the one serving (another `up` may have won a race).
  sleep 0.2
  if is_our_epmd "$pid"; then echo "$pid" >"$EPMD_PIDFILE"; fi
}

stop_epmd_if_ours() {
  local pid
  [[ -s $EPMD_PIDFILE ]] || return 0
  pid=$(tr -dc 0-9 <"$EPMD_PIDFILE")
  if is_our_epmd "$pid"; then
    if epmd -names 2>/dev/null | grep -q '^name '; then
      log "leaving epmd (pid $pid) running: other nodes are registered with it"
      return 0
    fi
    log "stopping epmd (pid $pid)"
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$EPMD_PIDFILE"
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
  if [[ -n $TLS_DIR ]]; then
    echo '[rabbitmq_auth_mechanism_ssl].' >"$BASE/enabled_plugins"
  else
    echo '[].' >"$BASE/enabled_plugins"
  fi
  cat >"$d/rabbitmq.conf" <<EOF
# written by local-cluster.sh; rewritten on every start
listeners.tcp.default = 127.0.0.1:${PORTS[i - 1]}
loopback_users = none
raft.segment_max_entries = 256
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
# A hung node (SIGSTOP, a frozen VM) fills the distribution buffers of its
# peers and holds up declarations and consumes cluster-wide until it is
# counted out: after net_ticktime (60 s by default) +-25 %. tests/hung.rs
# needs the transfers to go on within a minute.
net_ticktime = 15
# A partition heals by itself: when a hung node resumes, the side with
# fewer clients (the hung node) restarts and rejoins. RabbitMQ's partitions
# guide recommends pause_minority for three nodes or more, and the README
# does; tests/netns-cluster.sh, whose nodes are really cut apart, uses it.
# This loopback cluster serves the SIGSTOP tests, where pause_minority left
# the resumed node wedged on RabbitMQ 3.10; ignore stays partitioned for good.
cluster_partition_handling = autoheal
EOF
  if [[ -n $TLS_DIR ]]; then
    cat >>"$d/rabbitmq.conf" <<EOF
listeners.ssl.default = 127.0.0.1:${TLS_PORTS[i - 1]}
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
ssl_cert_login_from = common_name
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
EOF
  fi
}

# Checks before starting node N, made for all nodes before any is started so
# that a clash does not leave half a cluster behind.
preflight() {
  local i=$1 n
  n=$(node "$i")
  port_busy "${PORTS[i - 1]}" && die "AMQP port ${PORTS[i - 1]} for $n is already in use"
  port_busy "${DIST_PORTS[i - 1]}" && die "distribution port ${DIST_PORTS[i - 1]} for $n is already in use"
  if [[ -n $TLS_DIR ]] && port_busy "${TLS_PORTS[i - 1]}"; then
    die "amqps port ${TLS_PORTS[i - 1]} for $n is already in use"
  fi
  if epmd -names 2>/dev/null | grep -q "^name $NAME$i at port"; then
    die "a node named $n is registered with epmd but is not ours (choose another HAKOBU_RMQ_NAME)"
  fi
}

# Start node N detached; returns at once.
launch() {
  local i=$1 d n
  d=$(ndir "$i")
  n=$(node "$i")
  write_files "$i"
  rm -f "$(pidfile "$i")"
  log "starting $n (amqp ${PORTS[i - 1]}, dist ${DIST_PORTS[i - 1]})"
  env RABBITMQ_NODENAME="$n" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="${PORTS[i - 1]}" \
    RABBITMQ_DIST_PORT="${DIST_PORTS[i - 1]}" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_PID_FILE="$(pidfile "$i")" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} -hakobu_rmq_node $n" \
    "$BIN/rabbitmq-server" -detached </dev/null >>"$d/log/start.log" 2>&1
}

# The detached node writes its pid file only a moment after it starts; wait
# for it, so that `down` (or a caller's cleanup) can always find the node.
await_pidfile() {
  local i=$1 _
  for _ in $(seq 300); do
    node_pid "$i" >/dev/null && return 0
    sleep 0.1
  done
  tail -n 20 "$(ndir "$i")/log/$(node "$i").log" >&2 2>/dev/null || true
  die "$(node "$i") wrote no pid file within 30 s (logs in $(ndir "$i")/log)"
}

# Start the given nodes that are not running, all at once (after a full stop
# each waits for its peers' tables, so they must boot together), and wait
# until every given node has booted.
start_nodes() {
  local i pid todo=()
  for i in "$@"; do
    if pid=$(node_pid "$i"); then
      log "$(node "$i") already running (pid $pid)"
    else
      preflight "$i"
      todo+=("$i")
    fi
  done
  ensure_epmd
  for i in ${todo[@]+"${todo[@]}"}; do launch "$i"; done
  for i in ${todo[@]+"${todo[@]}"}; do await_pidfile "$i"; done
  for i in "$@"; do await_node "$i"; done
}

# True when node N has exited: its pid file names no live node, still 2 s
# later, and the node does not answer a ping. One look is not enough: a
# booting node was once taken for gone (in CI), launched again over itself,
# and the first one, its pid file removed by that launch, ran on unseen.
exited() {
  local i=$1
  [[ -s $(pidfile "$i") ]] && ! node_pid "$i" >/dev/null || return 1
  sleep 2
  [[ -s $(pidfile "$i") ]] && ! node_pid "$i" >/dev/null || return 1
  ! "$BIN/rabbitmq-diagnostics" -q -n "$(node "$i")" ping --timeout 5 </dev/null >/dev/null 2>&1
}

# Wait until node N has fully booted. (rabbitmqctl await_startup fails at once
# on 3.10 until the node is registered with epmd, and once it is, re-checks
# only every 10 s; check_running answers at once, so poll that.)
# A node restarted right after a kill -9 has been seen to exit while booting
# (once in CI, after a 200 MiB transfer through it); it is launched again, up
# to twice, with what it printed shown each time.
await_node() {
  local i=$1 n deadline relaunches=0
  n=$(node "$i")
  deadline=$((SECONDS + TIMEOUT))
  until "$BIN/rabbitmq-diagnostics" -q -n "$n" check_running </dev/null >/dev/null 2>&1; do
    if exited "$i"; then
      tail -n 20 "$(ndir "$i")/log/$n.log" >&2 2>/dev/null || true
      tail -n 20 "$(ndir "$i")/log/start.log" >&2 2>/dev/null || true
      if ((relaunches < 2)); then
        relaunches=$((relaunches + 1))
        log "$n exited while booting; launching it again ($relaunches of 2)"
        sleep 2
        launch "$i"
        await_pidfile "$i"
        continue
      fi
      die "$n exited while booting (logs in $(ndir "$i")/log)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 20 "$(ndir "$i")/log/$n.log" >&2 2>/dev/null || true
      die "$n did not boot within ${TIMEOUT}s (logs in $(ndir "$i")/log)"
    fi
    sleep 0.5
  done
  log "$n is running (pid $(node_pid "$i" || echo '?'))"
}

# Cluster members as node i sees them, one a line.
members() { ctl "$1" eval 'rabbit_mnesia:cluster_nodes(all).' | tr -d "[]' \n" | tr ',' '\n'; }

# Make sure node N (2 or 3) is clustered with a running peer (node 1 if it
# runs). A node restarted with its data rejoins by itself; a fresh or
# diverged one is reset and joined.
ensure_joined() {
  local i=$1 n j seed='' mine theirs
  n=$(node "$i")
  for j in 1 2 3; do
    [[ $j -ne $i ]] && node_pid "$j" >/dev/null && { seed=$j; break; }
  done
  if [[ -z $seed ]]; then log "no other node running; $n stays alone for now"; return 0; fi
  mine=$(members "$i")
  theirs=$(members "$seed")
  if grep -qxF "$(node "$seed")" <<<"$mine" && grep -qxF "$n" <<<"$theirs"; then
    return 0
  fi
  log "joining $n to $(node "$seed")"
  ctl_logged "$i" stop_app
  ctl_logged "$i" reset
  if grep -qxF "$n" <<<"$theirs"; then ctl_logged "$seed" forget_cluster_node "$n"; fi
  ctl_logged "$i" join_cluster "$(node "$seed")"
  ctl_logged "$i" start_app
  await_node "$i"
}

ensure_user() {
  local vhosts users
  vhosts=$(ctl 1 list_vhosts -s)
  grep -qxF -- "$VHOST" <<<"$vhosts" || ctl_logged 1 add_vhost "$VHOST"
  users=$(ctl 1 list_users -s | cut -f1)
  if grep -qxF -- "$RMQ_USER" <<<"$users"; then
    ctl 1 authenticate_user "$RMQ_USER" "$RMQ_PASS" >/dev/null 2>&1 ||
      ctl_logged 1 change_password "$RMQ_USER" "$RMQ_PASS"
  else
    ctl_logged 1 add_user "$RMQ_USER" "$RMQ_PASS"
  fi
  ctl_logged 1 set_user_tags "$RMQ_USER" administrator
  ctl_logged 1 set_permissions -p "$VHOST" "$RMQ_USER" '.*' '.*' '.*'
  if [[ $RMQ_USER != guest ]] && grep -qxF guest <<<"$users"; then
    ctl_logged 1 delete_user guest
  fi
}

# A user per hakobu node (see the header), created or updated with one
# `rabbitmqctl import_definitions`: the password (random, kept in
# $SECRETS/NODE.password, 0600) is hashed here, salted SHA-256 as RabbitMQ
# stores it, so that it is never on a command line. Prints the password files.
ensure_node_users() {
  local n pw pwfile esc tmp bs='\\' users='' perms='' sep=''
  [[ $# -gt 0 ]] || return 0
  (umask 077 && mkdir -p "$SECRETS")
  tmp=$(mktemp -d "$BASE/defs.XXXXXX")
  for n in "$@"; do
    [[ $n =~ ^[A-Za-z0-9_.-]{1,50}$ ]] || { rm -rf "$tmp"; die "'$n' is not a hakobu node name"; }
    pwfile=$SECRETS/$n.password
    if [[ ! -s $pwfile ]]; then
      (umask 077 && od -An -N18 -tx1 /dev/urandom | tr -d ' \n' >"$pwfile")
    fi
    pw=$(<"$pwfile")
    head -c4 /dev/urandom >"$tmp/salt"
    { cat "$tmp/salt"; printf '%s' "$pw"; } | openssl dgst -sha256 -binary >"$tmp/hash"
    # In JSON, the regular expressions' backslashes are doubled.
    esc=$(sed 's/\./\\\\./g' <<<"$n")
    users+=$(printf '%s{"name":"%s","password_hash":"%s","hashing_algorithm":"rabbit_password_hashing_sha256","tags":""}' \
      "$sep" "$n" "$(cat "$tmp/salt" "$tmp/hash" | base64 -w0)")
    perms+=$(printf '%s{"user":"%s","vhost":"%s","configure":"^hakobu%s.(node%s.%s|dead-letter)$","write":"^amq%s.default$","read":"^hakobu%s.node%s.%s$"}' \
      "$sep" "$n" "$VHOST" "$bs" "$bs" "$esc" "$bs" "$bs" "$bs" "$esc")
    sep=,
    echo "$pwfile"
  done
  printf '{"users":[%s],"permissions":[%s]}\n' "$users" "$perms" >"$tmp/defs.json"
  ctl_logged 1 import_definitions "$tmp/defs.json"
  rm -rf "$tmp"
}

urlencode() {
  local s=$1 out="" c k LC_ALL=C # bytes, for UTF-8 too
  for ((k = 0; k < ${#s}; k++)); do
    c=${s:k:1}
    case $c in
      [A-Za-z0-9._~-]) out+=$c ;;
      *) out+=$(printf '%%%02x' "'$c") ;;
    esac
  done
  echo "$out"
}

urls() {
  local i
  for i in 1 2 3; do
    echo "amqp://$(urlencode "$RMQ_USER"):$(urlencode "$RMQ_PASS")@127.0.0.1:${PORTS[i - 1]}/$(urlencode "$VHOST")"
  done
}

# The amqps URLs, without credentials (each agent gives its own).
tls_urls() {
  local i
  [[ -n $TLS_DIR ]] || die "no TLS listeners: set HAKOBU_RMQ_TLS_DIR"
  for i in 1 2 3; do
    echo "amqps://127.0.0.1:${TLS_PORTS[i - 1]}/$(urlencode "$VHOST")"
  done
}

# Stop the given nodes by their pids: SIGTERM to all (RabbitMQ shuts down
# cleanly, and deletes its pid file at once, so keep the pids), SIGKILL to any
# still alive after 30 s.
stop_nodes() {
  local i pid still pids=()
  for i in "$@"; do
    if pid=$(node_pid "$i"); then
      log "stopping $(node "$i") (pid $pid)"
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for _ in $(seq 300); do
    still=0
    for pid in ${pids[@]+"${pids[@]}"}; do
      if alive "$pid"; then still=1; fi
    done
    ((still)) || break
    sleep 0.1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    if alive "$pid"; then
      log "pid $pid still alive after 30 s, sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
  done
  for i in "$@"; do rm -f "$(pidfile "$i")"; done
}

cmd_up() {
  local t0=$SECONDS
  [[ -x $BIN/rabbitmq-server ]] || die "$BIN/rabbitmq-server not found (apt-get install rabbitmq-server)"
  start_nodes 1 2 3
  ensure_joined 2
  ensure_joined 3
  ensure_user
  # shellcheck disable=SC2086 # a list of names
  ensure_node_users $NODES >/dev/null
  log "cluster up in $((SECONDS - t0)) s; base $BASE${NODES:+; node users $NODES, passwords in $SECRETS}"
  urls
}

cmd_start() {
  local i=$1
  start_nodes "$i"
  if [[ $i -ne 1 ]]; then ensure_joined "$i"; else
    # node 1 is the seed; a fresh node 1 joins whichever peer runs.
    local m
    m=$(members 1)
    if ! grep -qxF "$(node 2)" <<<"$m" && ! grep -qxF "$(node 3)" <<<"$m"; then
      ensure_joined 1
    fi
  fi
}

cmd_down() {
  stop_nodes 1 2 3
  stop_epmd_if_ours
  log "down"
}

cmd_status() {
  local i pid rc=0 seed='' out members running partitions expected
  for i in 1 2 3; do
    if pid=$(node_pid "$i"); then
      printf '%-24s running  pid %-8s amqp 127.0.0.1:%s\n' "$(node "$i")" "$pid" "${PORTS[i - 1]}"
      [[ -n $seed ]] || seed=$i
    else
      printf '%-24s stopped\n' "$(node "$i")"
      rc=1
    fi
  done
  [[ -n $seed ]] || return 1
  # One rabbitmqctl call: members, running nodes and partitions as seen by $seed.
  if ! out=$(ctl "$seed" eval 'lists:flatten(io_lib:format("members=~w;running=~w;partitions=~w;",
      [rabbit_mnesia:cluster_nodes(all), rabbit_nodes:all_running(), rabbit_node_monitor:partitions()])).' 2>/dev/null); then
    echo "cluster: $(node "$seed") not answering"
    return 1
  fi
  out=$(tr -d "\"' \n" <<<"$out")
  field() { local v=${out#*"$1"=[}; v=${v%%]*}; echo "${v//,/ }"; }
  members=$(field members)
  running=$(field running)
  partitions=$(field partitions)
  echo "cluster members (seen from $(node "$seed")): $members"
  echo "running nodes: $running"
  echo "partitions: ${partitions:-none}"
  expected=$(printf '%s\n' "$(node 1)" "$(node 2)" "$(node 3)")
  [[ $(tr ' ' '\n' <<<"$running" | grep -cxF "$expected") -eq 3 ]] || rc=1
  [[ -z $partitions ]] || rc=1
  return "$rc"
}

# The number of the node that leads quorum queue $1, as a running node sees
# it; fails when no node runs, the queue is unknown or it has no leader now.
cmd_leader() {
  local q=$1 i seed='' leader
  for i in 1 2 3; do
    if node_pid "$i" >/dev/null; then seed=$i; break; fi
  done
  [[ -n $seed ]] || die "no node is running"
  leader=$(ctl "$seed" list_queues -p "$VHOST" -s name leader |
    awk -F'\t' -v q="$q" '$1 == q { print $2 }')
  for i in 1 2 3; do
    if [[ $leader == "$(node "$i")" ]]; then echo "$i"; return 0; fi
  done
  die "no leader for queue '$q' seen from $(node "$seed") (got '$leader')"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  urls) urls ;;
  tls-urls) tls_urls ;;
  user) shift; [[ $# -gt 0 ]] || usage; ensure_node_users "$@" ;;
  pid) check_n "${2:-}"; node_pid "$2" || die "$(node "$2") is not running" ;;
  start) check_n "${2:-}"; cmd_start "$2" ;;
  stop) check_n "${2:-}"; stop_nodes "$2" ;;
  ctl) check_n "${2:-}"; i=$2; shift 2; [[ $# -gt 0 ]] || usage; ctl "$i" "$@" ;;
  leader) [[ -n ${2:-} ]] || usage; cmd_leader "$2" ;;
  *) usage ;;
esac
