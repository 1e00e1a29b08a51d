#!/bin/sh
# Example post-receive job: "imports" the file by appending a line about it
# to var/import.log (next to where the agent runs). A real job would load the
# file into a database, or drop a new file into another outbox to chain jobs.
# Argument 1: the placed file ({path}); the context is in HAKOBU_* variables.
set -eu
log="${HAKOBU_IMPORT_LOG:-var/import.log}"
mkdir -p "$(dirname "$log")"
lines=$(wc -l < "$1")
printf '%s %s from=%s file_id=%s transfer=%s size=%s sha256=%s lines=%s path=%s\n' \
  "$HAKOBU_FINISHED_AT" "$HAKOBU_EVENT" "$HAKOBU_PEER" "$HAKOBU_FILE_ID" \
  "$HAKOBU_TRANSFER_ID" "$HAKOBU_SIZE" "$HAKOBU_SHA256" "$lines" "$1" >> "$log"
echo "imported $1 ($lines lines)"
