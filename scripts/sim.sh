#!/usr/bin/env bash
# The long run of the deterministic simulation (sim/): SEEDS seeds, 10,000 by
# default, split over the machine's cores (JOBS), release build. Each seed is
# ~8 simulated seconds of registrations, guesses and deletions on a 3-node
# group under crashes, restarts, partitions, lost/duplicated/reordered
# messages, a minority's disk rolled back or lost, and a stopped replica's
# state edited by its host (a record spliced back, a map deleted, metadata
# raised); the oracle checks every answer. A failing seed is printed with the
# command that replays it.
#
#   ./scripts/sim.sh            # 10,000 seeds
#   ./scripts/sim.sh 500        # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh --node
seeds=${1:-10000}
jobs=${JOBS:-$(nproc)}
cargo build --release --locked -p vault-sim
out=sim-results
mkdir -p "$out"
rm -f "$out"/shard-*
per=$(( (seeds + jobs - 1) / jobs ))
pids=()
for ((j = 0; j < jobs; j++)); do
  first=$(( 1 + j * per ))
  n=$per
  if (( first + n - 1 > seeds )); then n=$(( seeds - first + 1 )); fi
  (( n > 0 )) || continue
  ./target/release/vault-sim --first "$first" --seeds "$n" --sum-lines --keep-going \
    > "$out/shard-$j.txt" 2> "$out/shard-$j.progress" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
grep -h -A45 '^FAILED' "$out"/shard-*.txt || true
echo "== figures over $seeds seeds ($jobs processes) =="
grep -h '^sum ' "$out"/shard-*.txt |
  awk '{ total[$2] += $3 } END { for (k in total) printf "  %-44s %d\n", k, total[k] }' |
  sort | tee "$out/summary.txt"
if (( status == 0 )); then echo "PASSED: no invariant broken"; else echo "FAILED (see above)"; fi
exit $status
