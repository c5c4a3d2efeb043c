#!/usr/bin/env bash
# A test CA and certificates for mutual TLS on SecureLLM's internal gRPC ([internal_tls]; README
# "Internal TLS"). Each certificate is for one host and serves both ends (server and client auth).
#
#   scripts/certs.sh DIR [NAME=SAN[,SAN…] …]
#
# Writes DIR/ca.pem + DIR/ca.key (made once; reused when present) and DIR/NAME.pem + DIR/NAME.key
# for each NAME (default: `local=localhost,127.0.0.1,::1`). Keys are EC P-256 (PKCS#8), mode 0600.
# SANs that parse as IP addresses become IP SANs, the rest DNS names: list every name the
# services are dialled by (e.g. `node-a=node-a,node-a.internal,10.0.0.5`).
# For tests and small sites; a real deployment may use its own CA (any PEM CA, cert and key work).
set -euo pipefail
dir="${1:?usage: scripts/certs.sh DIR [NAME=SAN[,SAN…] …]}"
shift
[ "$#" -gt 0 ] || set -- "local=localhost,127.0.0.1,::1"
command -v openssl >/dev/null || { echo "certs.sh: openssl is needed (Debian: openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.pem" ] || [ ! -f "$dir/ca.key" ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 3650 -subj "/CN=SecureLLM internal CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$dir/ca.pem" 2>/dev/null
fi
for spec in "$@"; do
    name="${spec%%=*}"
    sans="${spec#*=}"
    [ "$name" != "$spec" ] && [ -n "$name" ] && [ -n "$sans" ] || { echo "certs.sh: $spec: expected NAME=SAN[,SAN…]" >&2; exit 2; }
    alt=""
    IFS=',' read -ra list <<<"$sans"
    for s in "${list[@]}"; do
        if [[ "$s" =~ ^[0-9.]+$ || "$s" == *:* ]]; then alt+="IP:$s,"; else alt+="DNS:$s,"; fi
    done
    alt="${alt%,}"
    ext="$(mktemp)"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$alt" >"$ext"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/$name.key" 2>/dev/null
    openssl req -new -key "$dir/$name.key" -subj "/CN=$name" -out "$dir/$name.csr" 2>/dev/null
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 825 -sha256 -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
    rm -f "$dir/$name.csr" "$ext"
    chmod 600 "$dir/$name.key"
    chmod 644 "$dir/$name.pem" "$dir/ca.pem"
    echo "$dir/$name.pem ($alt)"
done
