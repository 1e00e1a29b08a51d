#!/usr/bin/env bash
# tests/certs.sh — throwaway certificates for TLS tests, made with openssl.
#
#   tests/certs.sh DIR            a private CA (DIR/ca.pem, ca.key) and a server
#                                 certificate for localhost and 127.0.0.1
#                                 (DIR/server.pem, server.key), if missing
#   tests/certs.sh DIR NODE...    a client certificate per hakobu node, its CN
#                                 the node's name (DIR/NODE.pem, NODE.key),
#                                 signed by DIR's CA
#
# Keys are written 0600 (hakobu refuses a key others may read). EC P-256 keys,
# valid for 30 days: enough for a test run, useless afterwards.
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: $0 DIR [NODE...]" >&2; exit 2; }
DIR=$1
shift
command -v openssl >/dev/null || { echo "$0: openssl is needed (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$DIR"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME SUBJECT EXTFILE: DIR/NAME.pem from a fresh DIR/NAME.key.
sign() {
  local name=$1 subj=$2 ext=$3
  key "$DIR/$name.key"
  openssl req -new -key "$DIR/$name.key" -subj "$subj" -out "$DIR/$name.csr" 2>/dev/null
  openssl x509 -req -in "$DIR/$name.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" \
    -CAcreateserial -days 30 -sha256 -extfile "$ext" -out "$DIR/$name.pem" 2>/dev/null
  rm -f "$DIR/$name.csr"
  chmod 644 "$DIR/$name.pem"
}

if [[ ! -s $DIR/ca.pem ]]; then
  key "$DIR/ca.key"
  openssl req -x509 -new -key "$DIR/ca.key" -subj "/CN=hakobu test CA" -days 30 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$DIR/ca.pem" 2>/dev/null
  chmod 644 "$DIR/ca.pem"
fi
if [[ ! -s $DIR/server.pem ]]; then
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$DIR/server.ext"
  sign server "/CN=localhost" "$DIR/server.ext"
  # The broker runs as this user too; it must read its key.
  chmod 600 "$DIR/server.key"
fi
for node in "$@"; do
  [[ $node =~ ^[A-Za-z0-9_.-]{1,50}$ ]] || { echo "$0: '$node' is not a node name" >&2; exit 2; }
  [[ -s $DIR/$node.pem ]] && continue
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=clientAuth" >"$DIR/client.ext"
  sign "$node" "/CN=$node" "$DIR/client.ext"
done
