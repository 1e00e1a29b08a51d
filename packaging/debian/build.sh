#!/usr/bin/env bash
# packaging/debian/build.sh — builds the Debian package:
#   target/debian/hakobu_<version>-1_<arch>.deb (its path printed last).
# Builds the release binary, generates the shell completions and man pages
# from the clap definitions into target/generated/ (`hakobu generate`), then
# runs cargo-deb (`cargo install cargo-deb --locked` once), which strips the
# binary. Needs gzip and binutils (strip).
set -euo pipefail

cd "$(dirname "$0")/../.."
GEN=target/generated

if ! command -v cargo-deb >/dev/null; then
  echo "build.sh: cargo-deb is missing; install it with: cargo install cargo-deb --locked" >&2
  exit 2
fi

cargo build --release --bin hakobu
rm -rf "$GEN"
target/release/hakobu generate completions "$GEN/completions" >/dev/null
target/release/hakobu generate man "$GEN/man" >/dev/null
gzip -9n "$GEN"/man/*.1

# --no-build: the binary above; stripped, debug symbols neither kept beside it
# nor put in a dbgsym package.
cargo deb --no-build --strip --no-separate-debug-symbols --no-dbgsym "$@" | tail -n 1
