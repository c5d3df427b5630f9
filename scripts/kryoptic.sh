#!/usr/bin/env bash
# Builds the kryoptic PKCS#11 module (kryoptic-module/, release, with a
# vendored static OpenSSL from the openssl-src crate) if it is missing, and
# prints its path. The tests run against it with
#
#   VAULT_PKCS11=kryoptic PKCS11_MODULE=$(scripts/kryoptic.sh) cargo nextest run ...
#
# The first build compiles OpenSSL from source: about 3 minutes on 2 cores.
#
#   scripts/kryoptic.sh --check   only checks, in seconds, that what the build
#                                 runs is here and works (exit 1 and a line per
#                                 missing piece if not); scripts/ensure-deps.sh
#                                 installs what it reports missing.
set -euo pipefail
cd "$(dirname "$0")/../kryoptic-module"

# What the build itself runs: bindgen (kryoptic's PKCS#11 bindings) loads
# libclang; openssl-src runs `perl Configure` (which needs the modules below,
# IPC::Cmd among them: Debian's perl-base alone lacks it), then `make`; the cc
# crate compiles OpenSSL's and SQLite's C with `cc`.
check() {
  local missing=0
  python3 ../scripts/libclang-probe.py >/dev/null || missing=1
  if ! "${OPENSSL_SRC_PERL:-${PERL:-perl}}" -MIPC::Cmd -MFindBin -MFile::Spec::Functions \
       -MFile::Path -MGetopt::Std -MPOSIX -e 1 2>/dev/null; then
    echo "perl with the core modules OpenSSL's Configure uses (IPC::Cmd, FindBin, ...) is missing: install perl" >&2
    missing=1
  fi
  command -v make >/dev/null || { echo "make is missing" >&2; missing=1; }
  command -v "${CC:-cc}" >/dev/null || { echo "a C compiler (${CC:-cc}) is missing" >&2; missing=1; }
  return "$missing"
}

if [ "${1:-}" = --check ]; then
  check
  exit
fi

so="$PWD/target/release/libkryoptic_module.so"
if [ ! -e "$so" ] || [ -n "${KRYOPTIC_REBUILD:-}" ]; then
  check || { echo "the kryoptic module cannot be built here: run scripts/ensure-deps.sh" >&2; exit 1; }
  echo "building the kryoptic PKCS#11 module (vendored OpenSSL)..." >&2
  start=$(date +%s)
  nice cargo build --release --locked >&2
  echo "kryoptic module built in $(( $(date +%s) - start ))s" >&2
fi
echo "$so"
