#!/usr/bin/env bash
# The whole gate, the same locally and in CI: formatting, lints, and every
# test (unit, SoftHSM partition tests, end-to-end tests with real vault
# processes). nextest runs each test in its own process, which SoftHSM needs
# (one configuration per process).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real binaries: build them all first (cargo
# only builds a package's binaries for its own integration tests).
cargo build --workspace --bins --locked
# Deployment files: Kubernetes manifests against the API schemas, the
# systemd unit, the start script (see the script).
scripts/validate-deploy.sh
cargo nextest run --workspace --locked --no-fail-fast
# Every fuzz target briefly (fuzz/, see scripts/fuzz.sh): the build takes
# about 8 CPU-minutes (4–5 min on 2 idle cores), then FUZZ_SECONDS per
# target (13 targets).
scripts/fuzz.sh "${FUZZ_SECONDS:-12}"
