#!/bin/sh
# Example failure hook: writes an alert line to var/alerts.log and to stderr.
# A real one would page someone or open a ticket. Argument 1: the file id.
set -u
log="${HAKOBU_ALERT_LOG:-var/alerts.log}"
mkdir -p "$(dirname "$log")"
msg="$(date -u +%Y-%m-%dT%H:%M:%SZ) ALERT node=$HAKOBU_NODE event=$HAKOBU_EVENT file_id=${1:-$HAKOBU_FILE_ID} peer=$HAKOBU_PEER transfer=$HAKOBU_TRANSFER_ID file=$HAKOBU_FILE_NAME code=${HAKOBU_ERROR_CODE:-} error=${HAKOBU_ERROR:-}"
echo "$msg" >> "$log"
echo "$msg" >&2
