#!/usr/bin/env bash
# Makes a throw-away CA, a server certificate for localhost/127.0.0.1 and a client certificate,
# for the TLS tests: make-certs.sh DIR  →  DIR/{ca,server,client}.{pem,key}
set -euo pipefail
dir=$1
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=tlb test CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
for who in server client; do
    openssl req -newkey rsa:2048 -nodes -subj "/CN=tlb test $who" \
        -keyout "$who.key" -out "$who.csr" 2>/dev/null
    if [ "$who" = server ]; then
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext
    else
        printf 'extendedKeyUsage=clientAuth\n' > ext
    fi
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile ext -out "$who.pem" 2>/dev/null
done
rm -f ./*.csr ext ca.srl
