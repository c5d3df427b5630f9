#!/usr/bin/env bash
# Builds the kryoptic PKCS#11 module (kryoptic-module/, release, with a
# vendored static OpenSSL from the openssl-src crate) if it is missing, and
# prints its path. The tests run against it with
#
#   VAULT_PKCS11=kryoptic PKCS11_MODULE=$(scripts/kryoptic.sh) cargo nextest run ...
#
# The first build compiles OpenSSL from source: about 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../kryoptic-module"
so="$PWD/target/release/libkryoptic_module.so"
if [ ! -e "$so" ] || [ -n "${KRYOPTIC_REBUILD:-}" ]; then
  echo "building the kryoptic PKCS#11 module (vendored OpenSSL)..." >&2
  start=$(date +%s)
  nice cargo build --release --locked >&2
  echo "kryoptic module built in $(( $(date +%s) - start ))s" >&2
fi
echo "$so"
