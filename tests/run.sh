#!/usr/bin/env bash
# tests/run.sh — the project's test command: `cargo test --release "$@"` run
# against a throwaway three-node RabbitMQ cluster on loopback
# (packaging/rabbitmq/local-cluster.sh), which is always brought down on exit.
#
# Installs what the suites need (NEEDED below: rabbitmq-server, curl, ...) with
# apt-get when missing (without letting a package start its system-wide
# service). Exports for the tests:
#   HAKOBU_TEST_AMQP_URLS   the three nodes' AMQP URLs, comma-separated
#   HAKOBU_RMQ_BASE, HAKOBU_RMQ_NAME, HAKOBU_RMQ_PORTS
#                           so a test can run `local-cluster.sh pid N|stop N|start N`
#   HAKOBU_RMQ_CLUSTER      the path of local-cluster.sh
#   HAKOBU_RMQ_TLS_DIR      the cluster's TLS files (tests/certs.sh: a private CA,
#                           ca.pem and ca.key, and the server's certificate);
#                           client certificates are made there per node
#   HAKOBU_TEST_AMQPS_URLS  the three nodes' amqps URLs (client certificates
#                           required), comma-separated, without credentials
#   HAKOBU_TEST_DPKG        1 (as root, unless set) or 0: tests/package.rs
#                           installs the .deb on this machine, or not
#   HAKOBU_PREVIOUS_BIN     the previous release's binary (tests/previous-release.sh
#                           builds it once), for tests/upgrade.rs
# tests/partition.rs builds a cluster of its own, each node in a network
# namespace (tests/netns-cluster.sh, iproute2, root), and fails where
# namespaces cannot be made.
# Node users (local-cluster.sh `user NODE`) keep their passwords in
# $HAKOBU_RMQ_BASE/secrets.
# HAKOBU_RMQ_BASE defaults to a fresh temporary directory, removed after a
# successful run and kept (for the nodes' logs) after a failed one.
# The tests are built (`cargo test --release --no-run "$@"`) before the cluster
# is started. After the tests, the soak (tests/soak.sh, SOAK_MINUTES, default
# 1; 0 skips it). Exit status: cargo's, then the soak's, or non-zero if the
# cluster did not start.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CLUSTER=$ROOT/packaging/rabbitmq/local-cluster.sh

# What the suites need, one line each: the Debian package, then the file
# that shows it is installed.
NEEDED=(
  "rabbitmq-server /usr/lib/rabbitmq/bin/rabbitmq-server"
  "curl /usr/bin/curl"
  "openssl /usr/bin/openssl"
  "prometheus /usr/bin/promtool"
  "chromium /usr/bin/chromium"
  "chromium-driver /usr/bin/chromedriver"
  "binutils /usr/bin/readelf"
  "file /usr/bin/file"
  "dpkg-dev /usr/bin/dpkg-shlibdeps"
  "adduser /usr/sbin/adduser"
  "systemd /usr/bin/systemd-analyze"
  "iproute2 /usr/sbin/ip"
)

install_packages() {
  local sudo='' policy=/usr/sbin/policy-rc.d own_policy=''
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "tests/run.sh: installing $*" >&2
  # Keep the packages from starting their own services (rabbitmq-server's
  # would take ports 5672/25672).
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    own_policy=1
  fi
  local rc=0
  {
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@"
  } </dev/null || rc=$?
  [[ -z $own_policy ]] || $sudo rm -f "$policy"
  return "$rc"
}

missing=()
for need in "${NEEDED[@]}"; do
  read -r pkg file <<<"$need"
  [[ -e $file ]] || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] || install_packages "${missing[@]}"

# From PyPI: the OpenAPI validator tests/api.rs runs on /api/openapi.json.
python3 -c 'import openapi_spec_validator' 2>/dev/null ||
  python3 -m pip install -q openapi-spec-validator ||
  echo "tests/run.sh: could not install openapi-spec-validator; tests/api.rs will fail" >&2
# tests/package.rs builds the Debian package with cargo-deb, and installs it
# on this machine (dpkg -i, then --purge) when HAKOBU_TEST_DPKG=1: the
# default as root (CI), 0 otherwise; set it to choose.
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
if [[ -z ${HAKOBU_TEST_DPKG:-} ]]; then
  HAKOBU_TEST_DPKG=0
  [[ $(id -u) -ne 0 ]] || HAKOBU_TEST_DPKG=1
fi
export HAKOBU_TEST_DPKG

# Build first, so that a compile error needs no cluster and the nodes do not
# compete with the compiler for the CPU.
rc=0
cargo test --release --no-run "$@" || rc=$?
[[ $rc -eq 0 ]] || exit "$rc"
# The previous release, for tests/upgrade.rs (old and new agents side by
# side): built once from its commit, kept under target/previous-release/.
# Not needed when the arguments pick other suites only.
if [[ " $* " != *" --test "* || " $* " == *" --test upgrade "* ]]; then
  HAKOBU_PREVIOUS_BIN=$("$ROOT/tests/previous-release.sh")
  export HAKOBU_PREVIOUS_BIN
fi

own_base=''
if [[ -z ${HAKOBU_RMQ_BASE:-} ]]; then
  HAKOBU_RMQ_BASE=$(mktemp -d "${TMPDIR:-/tmp}/hakobu-rmq.XXXXXX")
  own_base=1
fi
export HAKOBU_RMQ_BASE
export HAKOBU_RMQ_NAME=${HAKOBU_RMQ_NAME:-rabbit}
export HAKOBU_RMQ_PORTS=${HAKOBU_RMQ_PORTS:-5672 5673 5674}
export HAKOBU_RMQ_CLUSTER=$CLUSTER
# TLS listeners (AMQP port + 1000) with a private CA made here.
export HAKOBU_RMQ_TLS_DIR=${HAKOBU_RMQ_TLS_DIR:-$HAKOBU_RMQ_BASE/tls}
"$ROOT/tests/certs.sh" "$HAKOBU_RMQ_TLS_DIR"

# shellcheck disable=SC2317 # (trap handlers)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  "$CLUSTER" down || true
  if [[ $rc -eq 0 && -n $own_base ]]; then
    rm -rf "$HAKOBU_RMQ_BASE"
  elif [[ -d $HAKOBU_RMQ_BASE ]]; then
    echo "tests/run.sh: RabbitMQ logs kept in $HAKOBU_RMQ_BASE/node*/log" >&2
  fi
  exit "$rc"
}
# On SIGINT/SIGTERM, pass the signal on to cargo and its test binaries (their
# own process group, see below), then exit through cleanup.
# shellcheck disable=SC2317
on_signal() {
  if [[ -n ${cargo_pid:-} ]]; then
    kill -"$1" -- "-$cargo_pid" 2>/dev/null || kill -"$1" "$cargo_pid" 2>/dev/null || true
    for _ in $(seq 100); do # up to 10 s; a zombie (state Z) has exited
      [[ $(awk '{print $3}' "/proc/$cargo_pid/stat" 2>/dev/null || echo Z) != Z ]] || break
      sleep 0.1
    done
    kill -KILL -- "-$cargo_pid" 2>/dev/null || true
  fi
  exit "$2"
}
cargo_pid=''
trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

urls=$("$CLUSTER" up </dev/null)
HAKOBU_TEST_AMQP_URLS=$(paste -sd, <<<"$urls")
export HAKOBU_TEST_AMQP_URLS
echo "tests/run.sh: HAKOBU_TEST_AMQP_URLS=$HAKOBU_TEST_AMQP_URLS" >&2
HAKOBU_TEST_AMQPS_URLS=$("$CLUSTER" tls-urls | paste -sd,)
export HAKOBU_TEST_AMQPS_URLS

# In the background and in a process group of its own, so that a signal to
# this script is handled at once (bash defers traps while a foreground command
# runs) and can be passed on to the test binaries too.
setsid cargo test --release "$@" &
cargo_pid=$!
wait "$cargo_pid" || rc=$?
cargo_pid=''

# Then the soak (tests/soak.sh) on the same cluster, for SOAK_MINUTES
# (default 1 here; 0 skips it): a stream of files while nodes and agents are
# killed at random, then every file checked. Longer by hand: SOAK_MINUTES=30.
if [[ $rc -eq 0 && ${SOAK_MINUTES:-1} != 0 ]]; then
  SOAK_MINUTES=${SOAK_MINUTES:-1} HAKOBU_BIN=$ROOT/target/release/hakobu setsid tests/soak.sh &
  cargo_pid=$!
  wait "$cargo_pid" || rc=$?
  cargo_pid=''
fi
exit "$rc"
