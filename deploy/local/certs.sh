#!/usr/bin/env bash
# Test certificates for TLS to PostgreSQL, Kafka and the registry front (openssl CLI only):
#
#   certs.sh DIR    writes into DIR (created if missing):
#     ca.pem, ca.key                 a self-signed test CA
#     server.pem, server.key         server certificate signed by the CA, SAN DNS:localhost,IP:127.0.0.1,
#                                    valid for 30 days; key in PKCS#8 PEM
#     server-bundle.pem              server.key + server.pem in one file (Kafka PEM keystore, HAProxy)
#     expired.pem, expired.key       the same names, signed by the CA, valid only 2020-01-01..2020-01-02
#     expired-bundle.pem             expired.key + expired.pem
#
# For tests and demos only: the CA key sits next to the certificates, unencrypted.
set -euo pipefail

dir="${1:?usage: certs.sh DIR}"
mkdir -p "$dir"
cd "$dir"

subj_ca="/CN=pgferry test CA"
san="subjectAltName=DNS:localhost,IP:127.0.0.1"

openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 30 -subj "$subj_ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# A minimal `openssl ca` setup: it is what can sign with an explicit start and end date.
mkdir -p ca-db
: >ca-db/index.txt
echo 1000 >ca-db/serial
cat >ca.cnf <<EOF
[ ca ]
default_ca = test_ca
[ test_ca ]
dir = ca-db
database = ca-db/index.txt
serial = ca-db/serial
new_certs_dir = ca-db
certificate = ca.pem
private_key = ca.key
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[ any ]
commonName = supplied
[ server_ext ]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
$san
EOF

# issue NAME START END: NAME.key (PKCS#8), NAME.pem, NAME-bundle.pem
issue() {
    local name="$1" start="$2" end="$3"
    openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=localhost" 2>/dev/null
    openssl ca -batch -config ca.cnf -extensions server_ext -in "$name.csr" -out "$name.pem" \
        -startdate "$start" -enddate "$end" -notext 2>/dev/null
    rm -f "$name.csr"
    cat "$name.key" "$name.pem" >"$name-bundle.pem"
}

now_minus_1d="$(date -u -d '-1 day' +%Y%m%d%H%M%SZ)"
plus_30d="$(date -u -d '+30 days' +%Y%m%d%H%M%SZ)"
issue server "$now_minus_1d" "$plus_30d"
issue expired 20200101000000Z 20200102000000Z
chmod 0644 ./*.pem ./*.key
echo "$dir"
