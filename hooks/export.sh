#!/bin/sh
# Example pre-send job (before_send): "exports" a table to the file the
# agent is about to send, $HAKOBU_PATH (a profile's source, or the spooled
# copy of an outbox file). A real job would run the database's export here.
# A non-zero exit fails the transfer with before_send_failed: nothing is sent.
set -eu
mkdir -p "$(dirname "$HAKOBU_PATH")"
tmp="$HAKOBU_PATH.tmp"
{
  echo "item,quantity,exported_at"
  echo "bolt,1200,$HAKOBU_STARTED_AT"
  echo "nut,800,$HAKOBU_STARTED_AT"
} > "$tmp"
mv "$tmp" "$HAKOBU_PATH"
echo "exported $HAKOBU_PATH for $HAKOBU_PEER"
