#!/bin/sh
# Example pre-send job (before_send): "exports" the stock table to the file
# the agent is about to send, $HAKOBU_PATH (a profile's source, or the
# spooled copy of an outbox file), as a Japanese shop's systems write it:
# Shift_JIS (CP932) with CRLF line ends. A real job would run the database's
# export here. A non-zero exit fails the transfer with before_send_failed:
# nothing is sent. STOCK_ROWS rows after the header (default 5000).
set -eu
rows="${STOCK_ROWS:-5000}"
mkdir -p "$(dirname "$HAKOBU_PATH")"
tmp="$HAKOBU_PATH.tmp"
{
  printf '品番,品名,数量,出力日時\r\n'
  awk -v n="$rows" -v at="$HAKOBU_STARTED_AT" 'BEGIN {
    for (i = 1; i <= n; i++) printf "%06d,ﾎﾞﾙﾄ①型,%d,%s\r\n", i, (i * 37) % 1000, at }'
} | iconv -f UTF-8 -t CP932 > "$tmp"
mv "$tmp" "$HAKOBU_PATH"
echo "exported $rows rows to $HAKOBU_PATH for $HAKOBU_PEER"
