#!/bin/sh
# Example post-receive job: "imports" the file by appending a line about it
# to var/import.log (next to where the agent runs). A real job would load the
# file into a database, or drop a new file into another outbox to chain jobs.
# Argument 1: the placed file ({path}); the context is in HAKOBU_* variables.
# While var/import.lock exists the "database" is busy: the job says so and
# exits 75 (EX_TEMPFAIL), for the hook's `retry:` to run it again later.
set -eu
log="${HAKOBU_IMPORT_LOG:-var/import.log}"
lock="${HAKOBU_IMPORT_LOCK:-var/import.lock}"
mkdir -p "$(dirname "$log")"
if [ -e "$lock" ]; then
  printf '%s busy attempt=%s transfer=%s\n' "$HAKOBU_FINISHED_AT" "${HAKOBU_ATTEMPT:-1}" \
    "$HAKOBU_TRANSFER_ID" >> "$log"
  echo "the database is busy ($lock exists); try again later" >&2
  exit 75
fi
lines=$(wc -l < "$1")
printf '%s %s from=%s file_id=%s transfer=%s size=%s sha256=%s lines=%s attempt=%s path=%s\n' \
  "$HAKOBU_FINISHED_AT" "$HAKOBU_EVENT" "$HAKOBU_PEER" "$HAKOBU_FILE_ID" \
  "$HAKOBU_TRANSFER_ID" "$HAKOBU_SIZE" "$HAKOBU_SHA256" "$lines" "${HAKOBU_ATTEMPT:-1}" "$1" >> "$log"
echo "imported $1 ($lines lines)"
