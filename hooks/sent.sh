#!/bin/sh
# Example sender hook: records a confirmed delivery in var/sent.log.
set -eu
log="${HAKOBU_SENT_LOG:-var/sent.log}"
mkdir -p "$(dirname "$log")"
printf '%s sent %s to %s transfer=%s size=%s\n' "$HAKOBU_FINISHED_AT" "$HAKOBU_FILE_NAME" \
  "$HAKOBU_PEER" "$HAKOBU_TRANSFER_ID" "$HAKOBU_SIZE" >> "$log"
