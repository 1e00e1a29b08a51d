#!/usr/bin/env bash
# tests/previous-release.sh — the previous release's `hakobu` binary, for the
# upgrade suite (tests/upgrade.rs): built once from its commit (git archive,
# `cargo build --release --locked` in a target directory of its own) and
# kept under target/previous-release/<commit>/, so later runs reuse it.
# Prints the binary's path on stdout. Fails loudly when the commit is not in
# this clone's history (a shallow clone: `git fetch --unshallow`).
#
#   PREVIOUS_RELEASE   the commit to build (default: release 0.1, 232e341)
#   CARGO_TARGET_DIR   where target/ is (default: the repository's target/)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
COMMIT=${PREVIOUS_RELEASE:-232e341524f180b6b840dbc9564e8f9e6c45b606}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
DIR=$TARGET/previous-release/$COMMIT
BIN=$DIR/hakobu

if [[ -x $BIN ]]; then
  echo "$BIN"
  exit 0
fi

if ! git -C "$ROOT" cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
  echo "tests/previous-release.sh: commit $COMMIT (the previous release) is not in this clone's history;" \
    "the upgrade suite builds it to run old and new agents side by side." \
    "Fetch the history (git fetch --unshallow) and run again." >&2
  exit 1
fi

mkdir -p "$DIR"
# One build at a time (two test processes may ask at once).
exec 9>"$DIR/.lock"
flock 9
if [[ -x $BIN ]]; then
  echo "$BIN"
  exit 0
fi

start=$(date +%s)
rm -rf "$DIR/src"
mkdir -p "$DIR/src"
git -C "$ROOT" archive "$COMMIT" | tar -x -C "$DIR/src"
echo "tests/previous-release.sh: building $COMMIT into $DIR (once)" >&2
# Optimised less and without debug information: its behaviour is the
# release's, and it builds in 400 s of CPU instead of 556 (its own profile,
# opt-level 3 and debug 1), about 3.5 minutes on two cores.
if ! (cd "$DIR/src" && cargo build --release --locked --bin hakobu --target-dir "$DIR/target" \
  --config 'profile.release.opt-level=1' --config 'profile.release.debug=0') \
  >"$DIR/build.log" 2>&1; then
  tail -n 40 "$DIR/build.log" >&2
  echo "tests/previous-release.sh: building $COMMIT failed (log: $DIR/build.log)" >&2
  exit 1
fi
# Only a finished build is taken for the binary.
cp "$DIR/target/release/hakobu" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "tests/previous-release.sh: built $COMMIT in $(($(date +%s) - start)) s" >&2
echo "$BIN"
