#!/usr/bin/env bash
# The benchmark: release builds of the vault and the load generator, then
# `vault-bench` with any arguments given (all scenarios by default; see
# `--help`). Results go to bench-results/ (JSON and an SVG chart per
# scenario, summary.md). Every scenario takes about 10 minutes on 2 cores,
# most of it growing stores to a million records.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh --node
# The `fleet` binary issues the TLS certificates the nodes run with.
cargo build --release --locked -p hsm-vault -p vault-bench -p fleet-manager
exec target/release/vault-bench "$@"
