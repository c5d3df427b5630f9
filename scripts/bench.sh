#!/usr/bin/env bash
# The benchmark: release builds of the vault and the load generator, then
# `vault-bench` with any arguments given (all scenarios by default; see
# `--help`). Results go to bench-results/ (JSON and an SVG chart per
# scenario, summary.md). Takes 15–25 minutes for every scenario, most of it
# growing the store to a million records.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo build --release --locked -p hsm-vault -p vault-bench
exec target/release/vault-bench "$@"
