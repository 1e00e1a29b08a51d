#!/usr/bin/env bash
# benches/run.sh — hakobu's benchmark (issue 5): hakobu measured side by side
# with what bounds it, in one run. Prints a table (target, measured, pass/fail)
# and writes the same figures as JSON.
#
# What it measures (sizes in binary units: 1 GiB = 2^30 bytes, MiB/s = 2^20 B/s):
#   ceiling   raw RabbitMQ: benches/raw_rabbitmq.rs, a publisher with confirms
#             (8 MiB window of 512 KiB persistent messages) and a consumer with
#             manual acks (prefetch 32) through one quorum queue of the same
#             three-node cluster; MiB/s for 1 GiB, first publish to last ack.
#   disk      `cp` of the 1 GiB file then `sync FILE` (fsync of the copy); and
#             two copies at once with `dd bs=8M oflag=dsync`: the embedded
#             path's own disk ceiling (its broker and its receiver each make
#             every byte durable), MiB/s each.
#   large     hakobu, 1 GiB file: from the drop into the outbox (a copy made
#             beforehand + done marker) to the start of the receiver's success hook,
#             through the cluster and through the embedded broker (a separate
#             `hakobu broker` process; both agents `embedded: { connect }`).
#             The ceiling and hakobu (cp+sync and embedded) alternate, A B A B,
#             HAKOBU_BENCH_ROUNDS times; ratios are per round, then averaged.
#   encrypted the large file through the cluster again, end-to-end encrypted
#             (`encrypt: true`, the receiver's key made with `hakobu keygen`,
#             `require_encryption: true`), in the same rounds, beside the plain one.
#   csv       a compressible 1 GiB CSV (text rows: ids, dates, branches,
#             amounts) through the cluster, without and with `compress: zstd`,
#             in the same rounds, beside the ceiling; with the bytes on the
#             wire from the sender's history (`wire_bytes`).
#   capped    200 MiB of the large file through the cluster with
#             `bandwidth: 20MiB/s` on the send profile: the measured rate
#             beside the cap (HAKOBU_BENCH_CAP_MIB, HAKOBU_BENCH_CAP_RATE).
#   small     2,000 files of 4 KiB written elsewhere, moved in with one `mv`,
#             then their done markers; files/s from the first `mv` to the
#             start of the last hook; through the cluster and the embedded broker.
#             Beside them, two ceilings: the raw RabbitMQ one with 2 x 2,000
#             messages of 4 KiB (a file is a chunk and a receipt: files/s is
#             messages/s / 2), and the per-file floor of the disk and the hook
#             (benches/small_ceiling.rs: what any receiver must do per file,
#             create + write + fdatasync, rename + fsync of the inbox, a log
#             file and the hook process, 64 files side by side, alone).
#   latency   200 files of 4 KiB, one after another, each dropped after the
#             previous hook started; drop-to-hook-start p50 and p99, cluster.
#   backlog   100,000 files of 4 KiB through the embedded broker (sqlite3
#             needed): dropped at once into a running pair; then as many to a
#             sender whose receiver is away, until all await their receipt;
#             then the sender restarted with them all awaiting, and the
#             receiver back to drain the queue. Peak RSS of each agent in
#             each phase (fresh processes), target <= 64 MiB each.
#   memory    peak RSS (VmHWM) of the sending and the receiving agent, read
#             when the transfer is done (each run uses fresh agents): the
#             1 GiB runs, and one 4 GiB run through the embedded broker (the
#             4 GiB file is four copies of the 1 GiB one).
#
# Each agent pair is fresh and sends one 4 KiB warm-up file first (connections
# and queues are set up outside the clock). The receiver's success hook is
# `/bin/date +%s.%N {file_name}` run without a shell; hakobu writes its output
# to the receiver's state_dir/logs/<transfer>.received.log, which is where the
# hook-start timestamps are read from. Drop times are bash's $EPOCHREALTIME.
#
# Usage: benches/run.sh          (from anywhere; builds with cargo --release once)
# Environment:
#   HAKOBU_TEST_AMQP_URLS    the three cluster nodes' AMQP URLs, comma-separated;
#                            unset: a throwaway cluster is started with
#                            packaging/rabbitmq/local-cluster.sh and brought
#                            down on exit, using HAKOBU_RMQ_NAME [bench],
#                            HAKOBU_RMQ_PORTS ["5972 5973 5974"] and
#                            HAKOBU_RMQ_BASE [a fresh temporary directory]
#   HAKOBU_BENCH_RESULTS     the JSON file [benches/results.json]
#   HAKOBU_BENCH_DIR         scratch directory, needs ~10 GiB [mktemp -d]; removed on exit.
#                            Put it on a journalled filesystem: on ext4 without a
#                            journal each run slows the next one down (warned)
#   HAKOBU_BENCH_KEEP        set: keep the scratch directory (and the cluster's logs)
#                            after a failed run
#   HAKOBU_BENCH_ROUNDS      A/B rounds for the large-file ratios [2]
#   HAKOBU_BENCH_LARGE_MIB   the large file [1024]
#   HAKOBU_BENCH_HUGE_X      the memory run's file, in multiples of the large one [4]
#   HAKOBU_BENCH_SMALL       small files [2000]
#   HAKOBU_BENCH_BACKLOG     the backlog's files [100000]
#   HAKOBU_BENCH_LATENCY     latency samples [200]
#   HAKOBU_BENCH_SKIP        space-separated parts to skip: ceiling disk floor latency huge,
#                            large (or large_cluster, large_encrypted, large_embedded),
#                            csv (or csv_plain, csv_zstd), capped, small (or
#                            small_cluster, small_embedded), backlog
#   HAKOBU_BENCH_PROFILE     a directory: for each hakobu measurement, keep the agents'
#                            logs and configurations there, and record the whole machine
#                            with `perf record -a -g` (TAG.perf.data) when perf is
#                            installed (HAKOBU_BENCH_PERF=agents: the agents alone, with
#                            DWARF call graphs); with HAKOBU_BENCH_TRACE=1 also the agents'
#                            syscalls with `perf trace -s` (TAG.syscalls.txt; slows them)
#   HAKOBU_BENCH_LOG         the agents' HAKOBU_LOG [info,lapin=warn]
#   HAKOBU_BENCH_WINDOW, HAKOBU_BENCH_PREFETCH
#                            the RabbitMQ window and prefetch, for hakobu and the
#                            raw ceiling alike [8MiB, 32: hakobu's defaults]
#   HAKOBU_BENCH_BIN         measure this hakobu binary instead of the one just built
#                            (to compare two builds on the same machine, same hour)
# Exit status: 0 when the run completed (whatever the pass/fail), 1 when a
# measurement could not be made (a timeout, a failed transfer), 2 on usage.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RESULTS=${HAKOBU_BENCH_RESULTS:-$ROOT/benches/results.json}
ROUNDS=${HAKOBU_BENCH_ROUNDS:-2}
LARGE_MIB=${HAKOBU_BENCH_LARGE_MIB:-1024}
HUGE_X=${HAKOBU_BENCH_HUGE_X:-4}
SMALL_N=${HAKOBU_BENCH_SMALL:-2000}
BACKLOG_N=${HAKOBU_BENCH_BACKLOG:-100000}
SMALL_SIZE=4096
LAT_N=${HAKOBU_BENCH_LATENCY:-200}
SKIP=" ${HAKOBU_BENCH_SKIP:-} "
CHUNK=512KiB
WINDOW=${HAKOBU_BENCH_WINDOW:-8MiB}
PREFETCH=${HAKOBU_BENCH_PREFETCH:-32}
T_START=$EPOCHREALTIME

log() { printf 'bench [%4ds]: %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# skipped PART [WHOLE]: PART (or the WHOLE it belongs to) is in HAKOBU_BENCH_SKIP.
skipped() { [[ $SKIP == *" $1 "* || ( -n ${2:-} && $SKIP == *" $2 "* ) ]]; }
# Float arithmetic: calc 'EXPR' (awk).
calc() { awk "BEGIN { printf \"%.6g\", ($1) }"; }
# A size in bytes as "1 GiB" or "64 MiB".
human() { if (($1 % 1073741824 == 0)); then echo "$(($1 >> 30)) GiB"; else echo "$(($1 >> 20)) MiB"; fi; }
# A bounded, fork-free sleep (read on a pipe that never delivers).
exec {NAP_FD}<> <(:)
nap() { read -r -t "$1" -u "$NAP_FD" _ || true; }

[[ $ROUNDS =~ ^[1-9][0-9]*$ && $LARGE_MIB =~ ^[1-9][0-9]*$ && $HUGE_X =~ ^[1-9][0-9]*$ &&
  $SMALL_N =~ ^[1-9][0-9]*$ && $LAT_N =~ ^[1-9][0-9]*$ ]] || {
  echo "benches/run.sh: HAKOBU_BENCH_* counts must be positive integers" >&2
  exit 2
}

# ---------------------------------------------------------------- clean-up
PIDS=()          # every process started here, stopped by pid on exit
OWN_CLUSTER=''
OWN_RMQ_BASE=''
WORK=''
# shellcheck disable=SC2317 # (trap handler)
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in ${PIDS[@]+"${PIDS[@]}"}; do
    if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; fi
  done
  for p in ${PIDS[@]+"${PIDS[@]}"}; do wait "$p" 2>/dev/null || true; done
  if [[ -n $OWN_CLUSTER ]]; then
    "$ROOT/packaging/rabbitmq/local-cluster.sh" down || true
    if [[ -n $OWN_RMQ_BASE ]]; then
      if [[ $rc -eq 0 ]]; then rm -rf "$OWN_RMQ_BASE"; else log "RabbitMQ logs kept in $OWN_RMQ_BASE"; fi
    fi
  fi
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ $rc -ne 0 && -n ${HAKOBU_BENCH_KEEP:-} ]]; then
      log "scratch kept in $WORK"
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- build
log "building (cargo build --release --bin hakobu --bench raw_rabbitmq --bench small_ceiling)"
build_json=$(cargo build --release --bin hakobu --bench raw_rabbitmq --bench small_ceiling \
  --message-format=json-render-diagnostics) || die "cargo build failed"
exe_of() {
  grep "\"name\":\"$1\"" <<<"$build_json" | grep -o '"executable":"[^"]*"' |
    tail -n 1 | sed 's/^"executable":"//; s/"$//'
}
HAKOBU=${HAKOBU_BENCH_BIN:-$(exe_of hakobu)}
RAW=$(exe_of raw_rabbitmq)
SMALL_CEIL=$(exe_of small_ceiling)
[[ -x $HAKOBU && -x $RAW && -x $SMALL_CEIL ]] ||
  die "cannot find the built binaries (hakobu: '$HAKOBU', raw_rabbitmq: '$RAW', small_ceiling: '$SMALL_CEIL')"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml 2>/dev/null | wc -l)

# ---------------------------------------------------------------- cluster
if [[ -z ${HAKOBU_TEST_AMQP_URLS:-} ]]; then
  [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] ||
    die "rabbitmq-server is not installed (tests/run.sh installs it), or set HAKOBU_TEST_AMQP_URLS"
  export HAKOBU_RMQ_NAME=${HAKOBU_RMQ_NAME:-bench}
  export HAKOBU_RMQ_PORTS=${HAKOBU_RMQ_PORTS:-5972 5973 5974}
  if [[ -z ${HAKOBU_RMQ_BASE:-} ]]; then
    HAKOBU_RMQ_BASE=$(mktemp -d "${TMPDIR:-/tmp}/hakobu-bench-rmq.XXXXXX")
    OWN_RMQ_BASE=$HAKOBU_RMQ_BASE
  fi
  export HAKOBU_RMQ_BASE
  log "starting a three-node cluster ($HAKOBU_RMQ_NAME, ports $HAKOBU_RMQ_PORTS)"
  OWN_CLUSTER=1
  urls=$("$ROOT/packaging/rabbitmq/local-cluster.sh" up </dev/null)
  HAKOBU_TEST_AMQP_URLS=$(paste -sd, <<<"$urls")
fi
IFS=, read -r -a URLS <<<"$HAKOBU_TEST_AMQP_URLS"
[[ ${#URLS[@]} -eq 3 ]] || die "HAKOBU_TEST_AMQP_URLS must list three URLs"
# The sender uses node 1 first, the receiver node 2 (as profiles/alpha.yaml and
# beta.yaml do); the raw ceiling publishes to node 1 and consumes from node 2.
SEND_URLS="\"${URLS[0]}\", \"${URLS[1]}\", \"${URLS[2]}\""
RECV_URLS="\"${URLS[1]}\", \"${URLS[2]}\", \"${URLS[0]}\""

# ---------------------------------------------------------------- scratch
WORK=${HAKOBU_BENCH_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/hakobu-bench.XXXXXX")}
mkdir -p "$WORK/data"
WORK=$(cd "$WORK" && pwd)
LARGE_BYTES=$((LARGE_MIB * 1048576))
HUGE_BYTES=$((LARGE_BYTES * HUGE_X))
need_kib=$(((LARGE_BYTES * (HUGE_X * 2 + 4)) / 1024))
avail_kib=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
((avail_kib > need_kib)) || die "$WORK has $((avail_kib / 1048576)) GiB free, the run needs about $((need_kib / 1048576)) GiB"
# ext4 without a journal checks, for every inode it hands out, whether it
# was freed in the last minutes and skips it if so: after a run has created
# and deleted thousands of files, the next run's creates slow down (seen:
# small files 560 -> 390 files/s over four runs in a row, the receiver's CPU
# doubled, half of it in the kernel's recently_deleted). Figures from such a
# directory do not compare from one run to the next; say so.
NO_JOURNAL=''
if [[ $(findmnt -no FSTYPE -T "$WORK" 2>/dev/null) == ext4 ]]; then
  dev=$(basename "$(findmnt -no SOURCE -T "$WORK")")
  if [[ $(cat "/sys/fs/ext4/$dev/journal_task" 2>/dev/null) == '<none>' ]]; then
    NO_JOURNAL=$dev
    log "WARNING: $WORK is on ext4 without a journal ($dev): file creation slows down after each run; small-file figures do not compare between runs. Set HAKOBU_BENCH_DIR on a journalled filesystem."
  fi
fi

CSV=''
if ! skipped csv_plain csv || ! skipped csv_zstd csv; then
  log "writing the ${LARGE_MIB} MiB CSV file"
  CSV=$WORK/data/large.csv
  # 64 MiB of rows (ids, dates, branches, amounts), repeated: each 512 KiB
  # chunk is compressed on its own, so the repetition gains zstd nothing.
  awk 'BEGIN { for (i = 0; n < 67108864; i++) {
      line = sprintf("%d,2026-12-%02d,branch-%03d,%s,%d.%02d,settled\n", i, 1 + i % 28, i % 211,
        (i % 3 ? "tokyo" : "osaka"), (i * 7919) % 100000, i % 100)
      n += length(line); printf "%s", line } }' >"$WORK/data/unit.csv"
  for ((i = 0; i <= LARGE_BYTES / 67108864; i++)); do cat "$WORK/data/unit.csv"; done 2>/dev/null |
    head -c "$LARGE_BYTES" >"$CSV" || true
  rm -f "$WORK/data/unit.csv"
  [[ $(stat -c %s "$CSV") -eq $LARGE_BYTES ]] || die "could not write $CSV"
fi

log "writing the ${LARGE_MIB} MiB test file"
BIG=$WORK/data/large.bin
# Incompressible bytes, fast: AES-CTR of zeros when openssl is there, else urandom.
if command -v openssl >/dev/null; then
  head -c "$LARGE_BYTES" /dev/zero |
    openssl enc -aes-128-ctr -nosalt -pass pass:hakobu-bench -pbkdf2 2>/dev/null |
    head -c "$LARGE_BYTES" >"$BIG"
else
  head -c "$LARGE_BYTES" /dev/urandom >"$BIG"
fi
[[ $(stat -c %s "$BIG") -eq $LARGE_BYTES ]] || die "could not write $BIG"
# The small files' content: 4 KiB of text (written with bash's printf, no fork per file).
SMALL_BODY=$(head -c $((SMALL_SIZE * 3 / 4)) "$BIG" | base64 -w 0)
((${#SMALL_BODY} == SMALL_SIZE)) || die "small file body is ${#SMALL_BODY} bytes"

# ---------------------------------------------------------------- processes
# start NAME LOGFILE CMD...: runs CMD in the background; its pid in $LAST_PID.
start() {
  local log=$1
  shift
  "$@" </dev/null >>"$log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
stop() {
  local p
  for p in "$@"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
CLK_TCK=$(getconf CLK_TCK)
# CPU seconds (user + system) a process has used so far; 0 when it is gone.
cpu_s() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  st=${st##*) }
  awk -v t="$CLK_TCK" '{ printf "%.2f", ($12 + $13) / t }' <<<"$st"
}
# CPU seconds of a process's children that it has waited for (the receiver's hooks).
children_cpu_s() {
  local st
  st=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  st=${st##*) }
  awk -v t="$CLK_TCK" '{ printf "%.2f", ($14 + $15) / t }' <<<"$st"
}
# CPU seconds of the three RabbitMQ nodes, when local-cluster.sh knows them (else empty).
rmq_cpu_s() {
  local i pid sum=0
  for i in 1 2 3; do
    pid=$("$ROOT/packaging/rabbitmq/local-cluster.sh" pid "$i" 2>/dev/null) || return 0
    sum=$(calc "$sum + $(cpu_s "$pid")")
  done
  echo "$sum"
}

free_port() {
  local p
  for p in $(seq 7971 7999); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  die "no free port in 7971-7999"
}

# embedded_broker DIR: starts `hakobu broker`; sets BROKER_PID, BROKER_DATA and BROKER_SECTION.
embedded_broker() {
  local dir=$1 port _
  port=$(free_port)
  mkdir -p "$dir"
  start "$dir/broker.log" "$HAKOBU" broker --listen "127.0.0.1:$port" --data "$dir/broker-data"
  BROKER_PID=$LAST_PID
  BROKER_DATA=$dir/broker-data
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$BROKER_PID" 2>/dev/null || die "hakobu broker exited: $(tail -n 5 "$dir/broker.log")"
    nap 0.05
  done
  BROKER_SECTION="broker:
  embedded: { connect: \"127.0.0.1:$port\" }"
}

PAIR_N=0
BROKER_PID=''
PAIR_KIND=''
# pair KIND DIR: writes two agents' configurations in DIR (KIND = cluster |
# embedded, the embedded broker already started) and starts them. Sets
# SEND_PID, RECV_PID, OUTBOX, INBOX, HOOKLOGS, STAGE, PAIR_A, PAIR_B.
# A fourth argument: more lines for the send profile (`    compress: zstd`).
pair() {
  local kind=$1 dir=$2 enc=${3:-} extra=${4:-} a b sb rb skeys='' rkeys='' sprof='' rprof='' pub
  PAIR_N=$((PAIR_N + 1))
  a=bench-$$-$PAIR_N-a
  b=bench-$$-$PAIR_N-b
  PAIR_A=$a PAIR_B=$b PAIR_KIND=$kind
  if [[ $kind == cluster ]]; then
    sb="broker:
  rabbitmq: { urls: [ $SEND_URLS ], window: $WINDOW, prefetch: $PREFETCH, verify_sender: false }"
    rb="broker:
  rabbitmq: { urls: [ $RECV_URLS ], window: $WINDOW, prefetch: $PREFETCH, verify_sender: false }"
  else
    sb=$BROKER_SECTION
    rb=$BROKER_SECTION
    # Each node its own credentials (in its state_dir/broker.secret).
    "$HAKOBU" broker add-node --data "$BROKER_DATA" "$a" -o "$dir/send/broker.secret" >/dev/null ||
      die "hakobu broker add-node $a failed"
    "$HAKOBU" broker add-node --data "$BROKER_DATA" "$b" -o "$dir/recv/broker.secret" >/dev/null ||
      die "hakobu broker add-node $b failed"
  fi
  OUTBOX=$dir/outbox
  INBOX=$dir/inbox
  STAGE=$dir/stage
  HOOKLOGS=$dir/recv/logs
  mkdir -p "$OUTBOX" "$INBOX" "$STAGE"
  # pair KIND DIR encrypted: end-to-end encryption, the receiver's key made here.
  if [[ $enc == encrypted ]]; then
    pub=$("$HAKOBU" keygen --out "$dir/recv.key" 2>/dev/null) || die "hakobu keygen failed"
    skeys="keys: { peers: { $b: \"$pub\" } }"
    rkeys="keys: { private_key_file: $dir/recv.key }"
    sprof="    encrypt: true"
    rprof="    require_encryption: true"
  fi
  cat >"$dir/send.yaml" <<EOF
node: $a
state_dir: $dir/send
$sb
$skeys
send:
  - file_id: BENCH
    outbox: $OUTBOX
    to: [ $b ]
    ready: { done_marker: ".done" }
    after_send: delete
    chunk_size: $CHUNK
$sprof
$extra
EOF
  cat >"$dir/recv.yaml" <<EOF
node: $b
state_dir: $dir/recv
$rb
$rkeys
receive:
  - file_id: BENCH
    from: [ $a ]
    inbox: $INBOX
    mode: replace
    on_success: { run: [ "/bin/date", "+%s.%N {file_name}" ], timeout: 5m }
$rprof
EOF
  "$HAKOBU" check -c "$dir/send.yaml" >/dev/null || die "bad configuration $dir/send.yaml"
  "$HAKOBU" check -c "$dir/recv.yaml" >/dev/null || die "bad configuration $dir/recv.yaml"
  start "$dir/recv.log" env HAKOBU_LOG="${HAKOBU_BENCH_LOG:-info,lapin=warn}" "$HAKOBU" run -c "$dir/recv.yaml"
  RECV_PID=$LAST_PID
  start "$dir/send.log" env HAKOBU_LOG="${HAKOBU_BENCH_LOG:-info,lapin=warn}" "$HAKOBU" run -c "$dir/send.yaml"
  SEND_PID=$LAST_PID
  # Warm-up: connections, queues and the first hook outside the clock.
  printf '%s' "$SMALL_BODY" >"$STAGE/warmup.dat"
  drop "$STAGE/warmup.dat"
  wait_hooks "$dir" 1 120
}

# unpair: stops the pair's agents (and its embedded broker); on the cluster,
# deletes their queues, so that no idle quorum queue is left to cost the
# nodes CPU in the runs that follow.
unpair() {
  stop "$SEND_PID" "$RECV_PID"
  if [[ -n $BROKER_PID ]]; then stop "$BROKER_PID"; fi
  BROKER_PID=''
  if [[ $PAIR_KIND == cluster ]]; then
    "$RAW" --publish-url "${URLS[0]}" --delete "hakobu.node.$PAIR_A" --delete "hakobu.node.$PAIR_B" ||
      log "could not delete the queues of $PAIR_A and $PAIR_B"
  fi
}

# drop PATH...: moves the files into the outbox, then creates their done markers.
drop() {
  local f
  mv -- "$@" "$OUTBOX/"
  for f in "$@"; do : >"$OUTBOX/${f##*/}.done"; done
}

# hook_count: hook logs that hold a line.
hook_lines() { cat "$HOOKLOGS"/*.received.log 2>/dev/null || true; }

# wait_hooks DIR N SECONDS: until N success hooks have started on the receiver.
wait_hooks() {
  local dir=$1 n=$2 limit=$3 deadline files
  deadline=$((SECONDS + limit))
  shopt -s nullglob
  while :; do
    files=("$HOOKLOGS"/*.received.log)
    if ((${#files[@]} >= n)) && (($(hook_lines | wc -l) >= n)); then break; fi
    if ((SECONDS > deadline)); then
      shopt -u nullglob
      log "timed out after ${limit}s waiting for $n hooks in $dir (saw ${#files[@]})"
      log "sender log:"; tail -n 15 "$dir/send.log" >&2 || true
      log "receiver log:"; tail -n 15 "$dir/recv.log" >&2 || true
      "$HAKOBU" history -c "$dir/send.yaml" --limit 5 >&2 || true
      "$HAKOBU" history -c "$dir/recv.yaml" --limit 5 >&2 || true
      exit 1
    fi
    if ((${#files[@]} + 50 < n)); then nap 0.2; else nap 0.01; fi
  done
  shopt -u nullglob
}

# hook_time NAME: the hook-start timestamp of file NAME.
hook_time() { hook_lines | awk -v n="$1" '$2 == n { print $1; exit }'; }

now() { echo "${EPOCHREALTIME/,/.}"; }

# ---------------------------------------------------------------- profiling
PROFILE=${HAKOBU_BENCH_PROFILE:-}
if [[ -n $PROFILE ]]; then
  mkdir -p "$PROFILE"
  PROFILE=$(cd "$PROFILE" && pwd)
fi
PROF_PIDS=()
# prof_start TAG PID...: perf on the given processes until prof_stop.
prof_start() {
  local tag=$1 pids
  shift
  PROF_PIDS=()
  [[ -n $PROFILE ]] && command -v perf >/dev/null || return 0
  pids=$(IFS=,; echo "$*")
  # The whole machine, so that the brokers, the hooks and the kernel's share
  # show too (on 2 cores they compete with the agents for the same CPU); or,
  # with HAKOBU_BENCH_PERF=agents, the agents alone with DWARF call graphs
  # (hakobu is built without frame pointers).
  if [[ ${HAKOBU_BENCH_PERF:-} == agents ]]; then
    start "$PROFILE/$tag.perf.log" perf record -F 499 --call-graph dwarf,16384 -p "$pids" -o "$PROFILE/$tag.perf.data"
  else
    start "$PROFILE/$tag.perf.log" perf record -a -F 499 -g -o "$PROFILE/$tag.perf.data"
  fi
  PROF_PIDS+=("$LAST_PID")
  # perf trace costs the traced processes much of their speed: only on request.
  if [[ -n ${HAKOBU_BENCH_TRACE:-} ]]; then
    start "$PROFILE/$tag.perf.log" perf trace -s -p "$pids" -o "$PROFILE/$tag.syscalls.txt"
    PROF_PIDS+=("$LAST_PID")
  fi
  nap 1
}
# prof_stop DIR TAG: stops perf, keeps the agents' logs and configurations.
prof_stop() {
  local dir=$1 tag=$2 p
  [[ -n $PROFILE ]] || return 0
  for p in ${PROF_PIDS[@]+"${PROF_PIDS[@]}"}; do
    kill -INT "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PROF_PIDS=()
  mkdir -p "$PROFILE/$tag"
  cp "$dir"/*.log "$dir"/*.yaml "$PROFILE/$tag/" 2>/dev/null || true
}

# ---------------------------------------------------------------- measurements
declare -A R   # results: key -> number

# Large file through hakobu: sets R[<tag>_mibs], R[<tag>_send_kib], R[<tag>_recv_kib],
# R[<tag>_wire] (the sender's wire_bytes).
# large_run KIND TAG FILE BYTES [encrypted] [SEND_PROFILE_LINES]
large_run() {
  local kind=$1 tag=$2 file=$3 bytes=$4 enc=${5:-} extra=${6:-} dir t0 t1 name wire
  dir=$WORK/$tag
  mkdir -p "$dir"
  if [[ $kind == embedded ]]; then embedded_broker "$dir"; fi
  pair "$kind" "$dir" "$enc" "$extra"
  name=big-$tag.bin
  # A copy of its own: the sender refuses a file with other hard links
  # (unsafe_source). Copied and synced before the clock starts.
  cp "$file" "$STAGE/$name"
  sync
  prof_start "$tag" "$SEND_PID" "$RECV_PID" ${BROKER_PID:+"$BROKER_PID"}
  cpu_mark "$kind"
  t0=$(now)
  drop "$STAGE/$name"
  wait_hooks "$dir" 2 1800
  t1=$(hook_time "$name")
  prof_stop "$dir" "$tag"
  R[${tag}_s]=$(calc "$t1 - $t0")
  R[${tag}_mibs]=$(calc "$bytes / 1048576 / ($t1 - $t0)")
  R[${tag}_send_kib]=$(hwm_kib "$SEND_PID")
  R[${tag}_recv_kib]=$(hwm_kib "$RECV_PID")
  wire=$("$HAKOBU" history -c "$dir/send.yaml" --json --limit 5 |
    grep -F "\"file_name\":\"$name\"" | grep -o '"wire_bytes":[0-9]*' | head -n 1 | cut -d: -f2) || true
  [[ -n $wire ]] && R[${tag}_wire]=$wire
  cpu_record "$tag" "$kind"
  if [[ $kind == embedded ]]; then R[${tag}_broker_kib]=$(hwm_kib "$BROKER_PID"); fi
  log "$tag: $(calc "$bytes / 1048576") MiB in ${R[${tag}_s]} s = ${R[${tag}_mibs]} MiB/s; peak RSS sender ${R[${tag}_send_kib]} KiB, receiver ${R[${tag}_recv_kib]} KiB; CPU s: sender ${R[${tag}_send_cpu_s]}, receiver ${R[${tag}_recv_cpu_s]}, broker ${R[${tag}_broker_cpu_s]:-${R[${tag}_rmq_cpu_s]:-?}}"
  unpair
  rm -rf "$dir"
}

# ceiling_run TAG [BYTES CHUNK]: the raw RabbitMQ ceiling [the large file, in $CHUNK messages].
ceiling_run() {
  local tag=$1 bytes=${2:-$LARGE_BYTES} chunk=${3:-$CHUNK} out rmq0 rmq1 TIMEFORMAT='%U %S'
  rmq0=$(rmq_cpu_s)
  # The client's own CPU seconds come from bash's `time` (TIMEFORMAT) on fd 3.
  { out=$( { time "$RAW" --publish-url "${URLS[0]}" --consume-url "${URLS[1]}" --bytes "$bytes" \
    --chunk "$chunk" --window "$WINDOW" --prefetch "$PREFETCH" --queue "hakobu.bench.raw.$$.$tag" 2>&4; } 2>&3); } 3>"$WORK/raw.time" 4>&2 ||
    die "raw_rabbitmq failed"
  rmq1=$(rmq_cpu_s)
  local v=${out#*\"mib_per_s\":} m=${out#*\"messages\":} t=${out#*\"seconds\":}
  R[${tag}_mibs]=${v%%[,\}]*}
  R[${tag}_msgs_per_s]=$(calc "${m%%[,\}]*} / ${t%%[,\}]*}")
  R[${tag}_client_cpu_s]=$(awk '{ printf "%.2f", $1 + $2 }' "$WORK/raw.time")
  if [[ -n $rmq0 && -n $rmq1 ]]; then R[${tag}_rmq_cpu_s]=$(calc "$rmq1 - $rmq0"); fi
  log "$tag: $out; CPU s: client ${R[${tag}_client_cpu_s]}, RabbitMQ ${R[${tag}_rmq_cpu_s]:-?}"
}

disk_run() {
  local tag=$1 t0 t1 dst=$WORK/data/copy.bin p1 p2
  sync
  t0=$(now)
  cp "$BIG" "$dst"
  sync "$dst"
  t1=$(now)
  R[${tag}_mibs]=$(calc "$LARGE_BYTES / 1048576 / ($t1 - $t0)")
  rm -f "$dst"
  # The embedded path's own disk ceiling: each byte is made durable twice,
  # by the broker and by the receiver, at the same time: two writers, each
  # syncing every 8 MiB (dd oflag=dsync), MiB/s each.
  sync
  t0=$(now)
  dd if="$BIG" of="$dst.1" bs=8M oflag=dsync status=none &
  p1=$!
  dd if="$BIG" of="$dst.2" bs=8M oflag=dsync status=none &
  p2=$!
  wait "$p1" && wait "$p2" || die "dd failed"
  t1=$(now)
  R[${tag}_two_mibs]=$(calc "$LARGE_BYTES / 1048576 / ($t1 - $t0)")
  log "$tag: cp + sync ${R[${tag}_mibs]} MiB/s; two durable copies at once ${R[${tag}_two_mibs]} MiB/s each"
  rm -f "$dst.1" "$dst.2"
}

# small_floor_run TAG: the per-file floor of the disk and the hook, alone.
small_floor_run() {
  local tag=$1 out v
  out=$("$SMALL_CEIL" --dir "$WORK/$tag" --files "$SMALL_N" --size "$SMALL_SIZE" --parallel 64 \
    -- /bin/date "+%s.%N {file_name}") || die "small_ceiling failed"
  v=${out#*\"files_per_s\":}
  R[${tag}_fps]=${v%%[,\}]*}
  log "$tag: $out"
  rm -rf "${WORK:?}/$tag"
}

# cpu_mark KIND / cpu_record TAG KIND: CPU seconds used between the two by
# the sender, the receiver, the hooks it ran, and the broker (hakobu's or
# RabbitMQ's three nodes).
cpu_mark() {
  CPU0=("$(cpu_s "$SEND_PID")" "$(cpu_s "$RECV_PID")" "$(cpu_s "${BROKER_PID:-0}")" "$(children_cpu_s "$RECV_PID")")
  [[ $1 == cluster ]] && RMQ0=$(rmq_cpu_s) || RMQ0=''
}
cpu_record() {
  local tag=$1 kind=$2
  R[${tag}_send_cpu_s]=$(calc "$(cpu_s "$SEND_PID") - ${CPU0[0]}")
  R[${tag}_recv_cpu_s]=$(calc "$(cpu_s "$RECV_PID") - ${CPU0[1]}")
  R[${tag}_hook_cpu_s]=$(calc "$(children_cpu_s "$RECV_PID") - ${CPU0[3]}")
  if [[ $kind == embedded ]]; then
    R[${tag}_broker_cpu_s]=$(calc "$(cpu_s "$BROKER_PID") - ${CPU0[2]}")
  elif [[ -n $RMQ0 ]]; then
    R[${tag}_rmq_cpu_s]=$(calc "$(rmq_cpu_s) - $RMQ0")
  fi
}

small_run() {
  local kind=$1 tag=$2 dir i t0 last
  dir=$WORK/$tag
  mkdir -p "$dir"
  if [[ $kind == embedded ]]; then embedded_broker "$dir"; fi
  pair "$kind" "$dir"
  mkdir -p "$STAGE/files"
  for ((i = 1; i <= SMALL_N; i++)); do printf '%s' "$SMALL_BODY" >"$STAGE/files/s$i.dat"; done
  sync
  prof_start "$tag" "$SEND_PID" "$RECV_PID" ${BROKER_PID:+"$BROKER_PID"}
  cpu_mark "$kind"
  t0=$(now)
  # One mv for all files, then their markers (created by bash itself).
  mv -- "$STAGE/files/"* "$OUTBOX/"
  for ((i = 1; i <= SMALL_N; i++)); do : >"$OUTBOX/s$i.dat.done"; done
  wait_hooks "$dir" $((SMALL_N + 1)) 900
  prof_stop "$dir" "$tag"
  last=$(hook_lines | awk '$2 != "warmup.dat" { print $1 }' | sort -n | tail -n 1)
  R[${tag}_s]=$(calc "$last - $t0")
  R[${tag}_fps]=$(calc "$SMALL_N / ($last - $t0)")
  cpu_record "$tag" "$kind"
  log "$tag: $SMALL_N files in ${R[${tag}_s]} s = ${R[${tag}_fps]} files/s; CPU s: sender ${R[${tag}_send_cpu_s]}, receiver ${R[${tag}_recv_cpu_s]}, hooks ${R[${tag}_hook_cpu_s]}, broker ${R[${tag}_broker_cpu_s]:-${R[${tag}_rmq_cpu_s]:-?}}"
  unpair
  rm -rf "$dir"
}

# count DB SQL: one number from an agent's state database (read-only), 0
# while it cannot be read.
count() { sqlite3 "file:$1?mode=ro" "$2" 2>/dev/null || echo 0; }
# wait_count DB SQL N WHAT: until the query counts N or more (an hour at most).
wait_count() {
  local t0 n
  t0=$(now)
  while :; do
    n=$(count "$1" "$2")
    ((n >= $3)) && return 0
    kill -0 "$SEND_PID" 2>/dev/null || die "backlog: the sender exited: $(tail -n 5 "$dir/send.log")"
    (($(calc "$(now) - $t0 > 3600"))) && die "backlog: $4: $n of $3 after an hour"
    nap 0.5
  done
}

# backlog_run TAG: memory under a backlog, on the embedded broker. BACKLOG_N
# files of 4 KiB dropped at once (one mv) to a running pair; then the same
# number to a sender whose receiver is away, until all of them await a
# receipt; then the receiver comes back and drains them. Records the peak
# RSS of the sender, the receiver and the broker in each phase (fresh
# processes per phase: VmHWM only grows). Progress is read from the
# agents' state databases (sqlite3): with this many files, counting hook
# logs would cost more than the agents.
backlog_run() {
  local tag=$1 i t0 sdb rdb
  dir=$WORK/$tag
  mkdir -p "$dir"
  embedded_broker "$dir"
  pair embedded "$dir"
  sdb=$dir/send/history.sqlite
  rdb=$dir/recv/history.sqlite
  local received="SELECT count(*) FROM transfers WHERE direction = 'receive' AND status = 'received'"
  local awaiting="SELECT count(*) FROM transfers WHERE direction = 'send' AND status = 'awaiting_receipt'"
  local sent="SELECT count(*) FROM transfers WHERE direction = 'send' AND status = 'sent'"
  backlog_files() {
    mkdir -p "$STAGE/files"
    for ((i = 1; i <= BACKLOG_N; i++)); do printf '%s' "$SMALL_BODY" >"$STAGE/files/$1$i.dat"; done
    # As few mv calls as the argument list allows.
    find "$STAGE/files" -maxdepth 1 -type f -exec mv -t "$OUTBOX" -- {} +
    for ((i = 1; i <= BACKLOG_N; i++)); do : >"$OUTBOX/$1$i.dat.done"; done
  }
  # Phase 1: dropped at once, receiver present.
  t0=$(now)
  backlog_files a
  wait_count "$rdb" "$received" $((BACKLOG_N + 1)) "files placed"
  R[${tag}_drop_s]=$(calc "$(now) - $t0")
  R[${tag}_drop_send_kib]=$(hwm_kib "$SEND_PID")
  R[${tag}_drop_recv_kib]=$(hwm_kib "$RECV_PID")
  log "$tag: $BACKLOG_N files dropped at once, all placed in ${R[${tag}_drop_s]} s; peak RSS sender ${R[${tag}_drop_send_kib]} KiB, receiver ${R[${tag}_drop_recv_kib]} KiB"
  # Phase 2: the receiver away; all sent, awaiting a receipt.
  stop "$SEND_PID" "$RECV_PID"
  start "$dir/send.log" env HAKOBU_LOG="${HAKOBU_BENCH_LOG:-info,lapin=warn}" "$HAKOBU" run -c "$dir/send.yaml"
  SEND_PID=$LAST_PID
  t0=$(now)
  backlog_files b
  wait_count "$sdb" "$awaiting" "$BACKLOG_N" "files awaiting a receipt"
  R[${tag}_away_s]=$(calc "$(now) - $t0")
  R[${tag}_away_send_kib]=$(hwm_kib "$SEND_PID")
  log "$tag: $BACKLOG_N files to an absent receiver, all awaiting a receipt in ${R[${tag}_away_s]} s; peak RSS sender ${R[${tag}_away_send_kib]} KiB"
  # Phase 3: the sender restarted with them all awaiting, then the
  # receiver back to drain the queue.
  stop "$SEND_PID"
  start "$dir/send.log" env HAKOBU_LOG="${HAKOBU_BENCH_LOG:-info,lapin=warn}" "$HAKOBU" run -c "$dir/send.yaml"
  SEND_PID=$LAST_PID
  t0=$(now)
  start "$dir/recv.log" env HAKOBU_LOG="${HAKOBU_BENCH_LOG:-info,lapin=warn}" "$HAKOBU" run -c "$dir/recv.yaml"
  RECV_PID=$LAST_PID
  wait_count "$rdb" "$received" $((2 * BACKLOG_N + 1)) "files placed"
  wait_count "$sdb" "$sent" $((2 * BACKLOG_N + 1)) "receipts settled"
  R[${tag}_drain_s]=$(calc "$(now) - $t0")
  R[${tag}_drain_send_kib]=$(hwm_kib "$SEND_PID")
  R[${tag}_drain_recv_kib]=$(hwm_kib "$RECV_PID")
  R[${tag}_broker_kib]=$(hwm_kib "$BROKER_PID")
  log "$tag: the receiver back, $BACKLOG_N placed and settled in ${R[${tag}_drain_s]} s; peak RSS sender ${R[${tag}_drain_send_kib]} KiB, receiver ${R[${tag}_drain_recv_kib]} KiB, broker ${R[${tag}_broker_kib]} KiB"
  unpair
  rm -rf "$dir"
}

latency_run() {
  local kind=$1 tag=$2 dir i t0 lat=()
  dir=$WORK/$tag
  mkdir -p "$dir"
  pair "$kind" "$dir"
  for ((i = 1; i <= LAT_N; i++)); do printf '%s' "$SMALL_BODY" >"$STAGE/l$i.dat"; done
  declare -A T0=()
  prof_start "$tag" "$SEND_PID" "$RECV_PID" ${BROKER_PID:+"$BROKER_PID"}
  for ((i = 1; i <= LAT_N; i++)); do
    T0[l$i.dat]=$(now)
    mv -- "$STAGE/l$i.dat" "$OUTBOX/"
    : >"$OUTBOX/l$i.dat.done"
    wait_hooks "$dir" $((i + 1)) 60
  done
  prof_stop "$dir" "$tag"
  mapfile -t lat < <(hook_lines | while read -r t n; do
    [[ -n ${T0[$n]:-} ]] && calc "($t - ${T0[$n]}) * 1000" && echo
  done | sort -g)
  ((${#lat[@]} == LAT_N)) || die "latency: got ${#lat[@]} samples, expected $LAT_N"
  # Nearest rank.
  R[${tag}_p50_ms]=${lat[$(((LAT_N * 50 + 99) / 100 - 1))]}
  R[${tag}_p99_ms]=${lat[$(((LAT_N * 99 + 99) / 100 - 1))]}
  R[${tag}_max_ms]=${lat[$((LAT_N - 1))]}
  log "$tag: p50 ${R[${tag}_p50_ms]} ms, p99 ${R[${tag}_p99_ms]} ms, max ${R[${tag}_max_ms]} ms"
  unpair
  rm -rf "$dir"
}

# ---------------------------------------------------------------- the run
log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
R[load_before]=$(cut -d' ' -f1 /proc/loadavg)
for ((r = 1; r <= ROUNDS; r++)); do
  if ! skipped ceiling; then
    ceiling_run "ceiling_r$r"
  fi
  if ! skipped large_cluster large; then
    large_run cluster "large_cluster_r$r" "$BIG" "$LARGE_BYTES"
  fi
  if ! skipped large_encrypted large; then
    large_run cluster "large_encrypted_r$r" "$BIG" "$LARGE_BYTES" encrypted
  fi
  if ! skipped disk; then
    disk_run "disk_r$r"
  fi
  if ! skipped large_embedded large; then
    large_run embedded "large_embedded_r$r" "$BIG" "$LARGE_BYTES"
  fi
  if ! skipped csv_plain csv; then
    large_run cluster "csv_plain_r$r" "$CSV" "$LARGE_BYTES"
  fi
  if ! skipped csv_zstd csv; then
    large_run cluster "csv_zstd_r$r" "$CSV" "$LARGE_BYTES" "" "    compress: zstd"
  fi
done
[[ -n $CSV ]] && rm -f "$CSV"
CAP_MIB=${HAKOBU_BENCH_CAP_MIB:-200}
CAP_RATE=${HAKOBU_BENCH_CAP_RATE:-20}
if ! skipped capped; then
  head -c $((CAP_MIB * 1048576)) "$BIG" >"$WORK/data/capped.bin"
  large_run cluster capped "$WORK/data/capped.bin" $((CAP_MIB * 1048576)) "" "    bandwidth: ${CAP_RATE}MiB/s"
  rm -f "$WORK/data/capped.bin"
fi
if ! skipped small; then
  if ! skipped ceiling; then
    # A file is two messages: its chunk and its receipt.
    ceiling_run small_ceiling $((2 * SMALL_N * SMALL_SIZE)) "$SMALL_SIZE"
    R[small_ceiling_fps]=$(calc "${R[small_ceiling_msgs_per_s]} / 2")
  fi
  if ! skipped floor; then
    small_floor_run small_floor
  fi
  if ! skipped small_cluster; then
    small_run cluster small_cluster
  fi
  if ! skipped small_embedded; then
    small_run embedded small_embedded
  fi
fi
if ! skipped backlog; then
  command -v sqlite3 >/dev/null || die "the backlog measurement needs the sqlite3 command (apt-get install sqlite3)"
  backlog_run backlog
fi
if ! skipped latency; then
  latency_run cluster latency_cluster
fi
if ! skipped huge; then
  HUGE=$WORK/data/huge.bin
  log "writing the $((HUGE_BYTES / 1048576)) MiB file for the memory run"
  for ((i = 0; i < HUGE_X; i++)); do cat "$BIG"; done >"$HUGE"
  large_run embedded huge_embedded "$HUGE" "$HUGE_BYTES"
  rm -f "$HUGE"
fi
rm -f "$BIG"
R[load_after]=$(cut -d' ' -f1 /proc/loadavg)
ELAPSED=$(calc "${EPOCHREALTIME/,/.} - ${T_START/,/.}")

# ---------------------------------------------------------------- table and JSON
# rounds_of KEY_PREFIX KEY_SUFFIX: the values of R[PREFIX_rN_SUFFIX] over the rounds.
rounds_of() {
  local p=$1 s=$2 r vals=()
  for ((r = 1; r <= ROUNDS; r++)); do
    [[ -n ${R[${p}_r${r}_$s]:-} ]] && vals+=("${R[${p}_r${r}_$s]}")
  done
  echo "${vals[*]:-}"
}
mean() { awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; if (NF) printf "%.6g", s / NF }' <<<"$1"; }
# mean_of KEY_PREFIX KEY_SUFFIX: their mean.
mean_of() { mean "$(rounds_of "$1" "$2")"; }
ratio_rounds() { # ratio_rounds A B [B_KIND]: per-round A_mibs / B_[B_KIND_]mibs
  local r out=() b
  for ((r = 1; r <= ROUNDS; r++)); do
    b=${2}_r${r}_${3:+${3}_}mibs
    if [[ -n ${R[${1}_r${r}_mibs]:-} && -n ${R[$b]:-} ]]; then
      out+=("$(calc "${R[${1}_r${r}_mibs]} / ${R[$b]}")")
    fi
  done
  echo "${out[*]:-}"
}
fmt() { [[ -n $1 ]] && awk -v v="$1" -v d="${2:-1}" 'BEGIN { printf "%.*f", d, v }' || echo "-"; }
mib() { [[ -n $1 ]] && awk -v v="$1" 'BEGIN { printf "%.1f", v / 1024 }' || echo "-"; }
list() { local x out=(); for x in $1; do out+=("$(fmt "$x" "${2:-2}")"); done; local IFS=,; echo "${out[*]}"; }

ROWS=()   # "target|measured|verdict"
JSON_ROWS=()
row() { # row NAME TARGET MEASURED VERDICT VALUE THRESHOLD UNIT
  ROWS+=("$1|$2|$3|$4")
  JSON_ROWS+=("$(printf '{"name":"%s","target":"%s","measured":"%s","result":"%s","value":%s,"threshold":%s,"unit":"%s"}' \
    "$1" "$2" "$3" "$4" "${5:-null}" "${6:-null}" "$7")")
}
verdict() { # verdict VALUE OP THRESHOLD
  [[ -z $1 ]] && { echo "n/a"; return; }
  [[ $(calc "$1 $2 $3") == 1 ]] && echo pass || echo FAIL
}

L=$(human "$LARGE_BYTES")
H=$(human "$HUGE_BYTES")
ceil=$(mean_of ceiling mibs)
clus=$(mean_of large_cluster mibs)
disk=$(mean_of disk mibs)
emb=$(mean_of large_embedded mibs)
rc=$(ratio_rounds large_cluster ceiling)
re=$(ratio_rounds large_embedded disk)
rcm=$(mean "$rc")
rem=$(mean "$re")

row "raw RabbitMQ ceiling ($L, quorum, $CHUNK)" "(reference)" "$(fmt "$ceil") MiB/s [$(list "$(rounds_of ceiling mibs)" 1)]" "-" "${ceil:-null}" null "MiB/s"
row "cp + sync ($L)" "(reference)" "$(fmt "$disk") MiB/s [$(list "$(rounds_of disk mibs)" 1)]" "-" "${disk:-null}" null "MiB/s"
two=$(mean_of disk two_mibs)
row "two durable copies at once ($L, dsync 8 MiB)" "(reference)" "$(fmt "$two") MiB/s each [$(list "$(rounds_of disk two_mibs)" 1)]" "-" "${two:-null}" null "MiB/s"
row "large file ($L) via cluster / ceiling" ">= 0.90" "$(fmt "$rcm" 2) [$(list "$rc")] = $(fmt "$clus") MiB/s" "$(verdict "$rcm" '>=' 0.9)" "${rcm:-null}" 0.9 "ratio"
row "large file ($L) via embedded / (cp+sync)" ">= 0.40" "$(fmt "$rem" 2) [$(list "$re")] = $(fmt "$emb") MiB/s" "$(verdict "$rem" '>=' 0.4)" "${rem:-null}" 0.4 "ratio"
# End-to-end encrypted, beside the plain line: against the ceiling, and against plain.
enc=$(mean_of large_encrypted mibs)
rx=$(ratio_rounds large_encrypted ceiling)
rxp=$(ratio_rounds large_encrypted large_cluster)
row "large file ($L) encrypted via cluster / ceiling" "(no target)" "$(fmt "$(mean "$rx")" 2) [$(list "$rx")] = $(fmt "$enc") MiB/s; $(fmt "$(mean "$rxp")" 2) of plain" "-" "${enc:-null}" null "MiB/s"
# A compressible CSV, plain and compressed, beside the ceiling; the bytes on the wire.
for v in plain zstd; do
  m=$(mean_of "csv_$v" mibs)
  rr=$(ratio_rounds "csv_$v" ceiling)
  w=$(mean_of "csv_$v" wire)
  wtxt='-'
  [[ -n $w ]] && wtxt="$(fmt "$(calc "$w / 1048576")" 0) MiB ($(fmt "$(calc "100 * $w / $LARGE_BYTES")" 0)%)"
  label="CSV ($L) via cluster / ceiling"
  [[ $v == zstd ]] && label="CSV ($L) compress: zstd via cluster / ceiling"
  row "$label" "(no target)" "$(fmt "$(mean "$rr")" 2) [$(list "$rr")] = $(fmt "$m") MiB/s; wire $wtxt" "-" "${m:-null}" null "MiB/s"
done
# A capped profile: the rate measured beside the cap (drop to hook start).
row "capped profile ($CAP_MIB MiB, bandwidth: ${CAP_RATE}MiB/s) via cluster" "<= $CAP_RATE MiB/s (+ burst)" "$(fmt "${R[capped_mibs]:-}") MiB/s, cap $CAP_RATE MiB/s" "$(verdict "${R[capped_mibs]:-}" '<=' "$(calc "$CAP_RATE * 1.05")")" "${R[capped_mibs]:-null}" "$CAP_RATE" "MiB/s"
# The bound the embedded path cannot pass on one disk (see the reference row).
rt=$(ratio_rounds large_embedded disk two)
rtm=$(mean "$rt")
row "large file ($L) via embedded / two copies (info)" "(no target)" "$(fmt "$rtm" 2) [$(list "$rt")]" "-" "${rtm:-null}" null "ratio"
row "raw RabbitMQ ceiling, 4 KiB messages / 2" "(reference)" "$(fmt "${R[small_ceiling_fps]:-}" 0) files/s ($(fmt "${R[small_ceiling_msgs_per_s]:-}" 0) msg/s)" "-" "${R[small_ceiling_fps]:-null}" null "files/s"
row "per-file floor: disk + hook, alone ($SMALL_N)" "(reference)" "$(fmt "${R[small_floor_fps]:-}" 0) files/s" "-" "${R[small_floor_fps]:-null}" null "files/s"
# of_ceiling VALUE CEILING: " (0.42 of ceiling)", or nothing when either is missing.
of_ceiling() { [[ -n $1 && -n $2 ]] && echo " ($(fmt "$(calc "$1 / $2")" 2) of $3)" || true; }
row "small files via cluster ($SMALL_N x 4 KiB)" ">= 500 files/s" "$(fmt "${R[small_cluster_fps]:-}" 0) files/s$(of_ceiling "${R[small_cluster_fps]:-}" "${R[small_floor_fps]:-}" floor)" "$(verdict "${R[small_cluster_fps]:-}" '>=' 500)" "${R[small_cluster_fps]:-null}" 500 "files/s"
row "small files via embedded ($SMALL_N x 4 KiB)" ">= 1500 files/s" "$(fmt "${R[small_embedded_fps]:-}" 0) files/s$(of_ceiling "${R[small_embedded_fps]:-}" "${R[small_floor_fps]:-}" floor)" "$(verdict "${R[small_embedded_fps]:-}" '>=' 1500)" "${R[small_embedded_fps]:-null}" 1500 "files/s"
row "latency p50 via cluster ($LAT_N files)" "<= 50 ms" "$(fmt "${R[latency_cluster_p50_ms]:-}") ms" "$(verdict "${R[latency_cluster_p50_ms]:-}" '<=' 50)" "${R[latency_cluster_p50_ms]:-null}" 50 "ms"
row "latency p99 via cluster ($LAT_N files)" "<= 250 ms" "$(fmt "${R[latency_cluster_p99_ms]:-}") ms (max $(fmt "${R[latency_cluster_max_ms]:-}") ms)" "$(verdict "${R[latency_cluster_p99_ms]:-}" '<=' 250)" "${R[latency_cluster_p99_ms]:-null}" 250 "ms"

# Peak RSS: the largest over the rounds, per agent and broker.
max_of() { awk '{ m = 0; for (i = 1; i <= NF; i++) if ($i > m) m = $i; if (NF) print m }' <<<"$1"; }
for side in send recv; do
  who=sender
  [[ $side == recv ]] && who=receiver
  for b in cluster embedded; do
    v=$(max_of "$(rounds_of "large_$b" "${side}_kib")")
    row "peak RSS $who, $L via $b" "<= 64 MiB" "$(mib "$v") MiB" "$(verdict "$v" '<=' 65536)" "${v:-null}" 65536 "KiB"
  done
  h=${R[huge_embedded_${side}_kib]:-}
  one=$(max_of "$(rounds_of large_embedded "${side}_kib")")
  row "peak RSS $who, $H via embedded" "<= 64 MiB" "$(mib "$h") MiB" "$(verdict "$h" '<=' 65536)" "${h:-null}" 65536 "KiB"
  # "The same": the larger file may cost at most 25% or 8 MiB more, whichever
  # is larger (fresh agents moving the same file peak up to ~5 MiB apart, from
  # one run to the next: allocator arenas), where a cost per byte would show
  # as growth in proportion to the size.
  if [[ -n $h && -n $one ]]; then
    lim=$(calc "($one * 1.25 > $one + 8192) ? $one * 1.25 : $one + 8192")
    row "peak RSS $who, $H vs $L (embedded)" "same (<= +max(25%, 8 MiB))" "$(mib "$one") -> $(mib "$h") MiB" "$(verdict "$h" '<=' "$lim")" "$(calc "$h - $one")" "$(calc "$lim - $one")" "KiB"
  fi
done
bk=$(max_of "$(rounds_of large_embedded broker_kib)")
# CPU seconds for the large file (mean over rounds): on 2 cores the agents and
# the brokers compete for the same CPU, so this explains much of a ratio.
c_cli=$(mean_of ceiling client_cpu_s)
c_rmq=$(mean_of ceiling rmq_cpu_s)
h_snd=$(mean_of large_cluster send_cpu_s)
h_rcv=$(mean_of large_cluster recv_cpu_s)
h_rmq=$(mean_of large_cluster rmq_cpu_s)
e_snd=$(mean_of large_embedded send_cpu_s)
e_rcv=$(mean_of large_embedded recv_cpu_s)
e_brk=$(mean_of large_embedded broker_cpu_s)
row "CPU s, $L: raw client + RabbitMQ (info)" "(no target)" "$(fmt "$c_cli") + $(fmt "$c_rmq")" "-" "${c_cli:-null}" null "s"
row "CPU s, $L via cluster: sender + receiver + RabbitMQ (info)" "(no target)" "$(fmt "$h_snd") + $(fmt "$h_rcv") + $(fmt "$h_rmq")" "-" "${h_snd:-null}" null "s"
x_snd=$(mean_of large_encrypted send_cpu_s)
x_send_kib=$(max_of "$(rounds_of large_encrypted send_kib)")
x_recv_kib=$(max_of "$(rounds_of large_encrypted recv_kib)")
row "CPU s, $L encrypted via cluster: sender + receiver + RabbitMQ (info)" "(no target)" "$(fmt "$x_snd") + $(fmt "$(mean_of large_encrypted recv_cpu_s)") + $(fmt "$(mean_of large_encrypted rmq_cpu_s)")" "-" "${x_snd:-null}" null "s"
row "peak RSS sender / receiver, $L encrypted via cluster (info)" "(no target)" "$(mib "$x_send_kib") / $(mib "$x_recv_kib") MiB" "-" "${x_recv_kib:-null}" null "KiB"
row "CPU s, $L via embedded: sender + receiver + broker (info)" "(no target)" "$(fmt "$e_snd") + $(fmt "$e_rcv") + $(fmt "$e_brk")" "-" "${e_snd:-null}" null "s"
s_snd=${R[small_cluster_send_cpu_s]:-}
row "CPU s, small via cluster: sender + receiver + hooks + RabbitMQ (info)" "(no target)" "$(fmt "$s_snd") + $(fmt "${R[small_cluster_recv_cpu_s]:-}") + $(fmt "${R[small_cluster_hook_cpu_s]:-}") + $(fmt "${R[small_cluster_rmq_cpu_s]:-}") in $(fmt "${R[small_cluster_s]:-}") s" "-" "${s_snd:-null}" null "s"
row "CPU s, small via embedded: sender + receiver + hooks + broker (info)" "(no target)" "$(fmt "${R[small_embedded_send_cpu_s]:-}") + $(fmt "${R[small_embedded_recv_cpu_s]:-}") + $(fmt "${R[small_embedded_hook_cpu_s]:-}") + $(fmt "${R[small_embedded_broker_cpu_s]:-}") in $(fmt "${R[small_embedded_s]:-}") s" "-" "${R[small_embedded_send_cpu_s]:-null}" null "s"
row "CPU s, small raw ceiling: client + RabbitMQ (info)" "(no target)" "$(fmt "${R[small_ceiling_client_cpu_s]:-}") + $(fmt "${R[small_ceiling_rmq_cpu_s]:-}")" "-" "${R[small_ceiling_client_cpu_s]:-null}" null "s"
row "peak RSS hakobu broker, $L / $H (info)" "(no target)" "$(mib "$bk") / $(mib "${R[huge_embedded_broker_kib]:-}") MiB" "-" "${R[huge_embedded_broker_kib]:-null}" null "KiB"

# The backlog (issue 15): each agent under 64 MiB however many files wait.
BN=$(printf "%'d" "$BACKLOG_N")
for ph in "drop|dropped at once|drop_send_kib drop_recv_kib" "away|to an absent receiver|away_send_kib" "drain|awaiting, then drained|drain_send_kib drain_recv_kib"; do
  IFS='|' read -r _ what keys <<<"$ph"
  for k in $keys; do
    v=${R[backlog_$k]:-}
    who=sender
    [[ $k == *recv* ]] && who=receiver
    row "peak RSS $who, $BN files $what (embedded)" "<= 64 MiB" "$(mib "$v") MiB" "$(verdict "$v" '<=' 65536)" "${v:-null}" 65536 "KiB"
  done
done
row "backlog: $BN files dropped at once, placed (info)" "(no target)" "$(fmt "${R[backlog_drop_s]:-}") s = $(fmt "$( [[ -n ${R[backlog_drop_s]:-} ]] && calc "$BACKLOG_N / ${R[backlog_drop_s]}")" 0) files/s" "-" "${R[backlog_drop_s]:-null}" null "s"
row "peak RSS hakobu broker, $BN files queued and drained (info)" "(no target)" "$(mib "${R[backlog_broker_kib]:-}") MiB" "-" "${R[backlog_broker_kib]:-null}" null "KiB"

# The table.
{
  echo
  echo "hakobu benchmark: commit $COMMIT$( ((DIRTY)) && echo " (+ uncommitted changes)"), $(nproc) cores, load average ${R[load_before]} -> ${R[load_after]}, $ROUNDS A/B rounds, ${ELAPSED%.*} s"
  printf '%-52s  %-28s  %-46s  %s\n' "measurement" "target" "measured [per round]" "result"
  printf '%-52s  %-28s  %-46s  %s\n' "$(printf '%.0s-' {1..52})" "$(printf '%.0s-' {1..28})" "$(printf '%.0s-' {1..46})" "------"
  for line in "${ROWS[@]}"; do
    IFS='|' read -r a b c d <<<"$line"
    printf '%-52s  %-28s  %-46s  %s\n' "$a" "$b" "$c" "$d"
  done
  [[ -z $NO_JOURNAL ]] || echo "WARNING: the scratch directory is on ext4 without a journal ($NO_JOURNAL): small-file figures slow down run after run; compare only runs on a journalled filesystem."
  echo
}

# The JSON: the rows, and every raw figure.
{
  printf '{\n  "commit": "%s",\n  "dirty": %s,\n  "date": "%s",\n  "cores": %s,\n  "rounds": %s,\n  "elapsed_s": %s,\n  "scratch_journalled": %s,\n' \
    "$COMMIT" "$( ((DIRTY)) && echo true || echo false)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(nproc)" "$ROUNDS" "$ELAPSED" "$([[ -n $NO_JOURNAL ]] && echo false || echo true)"
  printf '  "rows": [\n    %s\n  ],\n' "$(IFS=$'\n'; sed '$!s/$/,/' <<<"${JSON_ROWS[*]}" | sed '2,$s/^/    /')"
  printf '  "raw": {\n'
  mapfile -t keys < <(printf '%s\n' "${!R[@]}" | sort)
  for k in "${keys[@]}"; do printf '    "%s": %s,\n' "$k" "${R[$k]}"; done | sed '$s/,$//'
  printf '  }\n}\n'
} >"$RESULTS"
log "results written to $RESULTS"
