#!/usr/bin/env bash
# Fuzzes every decoder of bytes that come from the network or from disk
# (fuzz/fuzz_targets/, see ARCHITECTURE.md, *Tests*) with cargo-fuzz and
# libFuzzer, each target for a bounded time, and fails if any target crashes
# (panic, failed assertion, sanitizer report), runs longer than the timeout on
# one input, or goes over the memory limits.
#
#   scripts/fuzz.sh             20 s per target (the gate runs 12 s)
#   scripts/fuzz.sh 600         10 minutes per target
#   scripts/fuzz.sh 60 record   one target (or several)
#
# Only a stable toolchain is assumed: cargo-fuzz needs unstable rustc flags
# (sanitizer, coverage instrumentation), which RUSTC_BOOTSTRAP=1 allows.
#
# AddressSanitizer is on by default: besides memory errors in dependencies'
# unsafe code, its malloc hooks are what lets libFuzzer enforce the
# per-allocation limit (with `none` the build takes about a quarter less CPU
# and runs twice as many inputs, but -malloc_limit_mb is not enforced).
#
# Environment: FUZZ_SANITIZER (address | none; default address),
# FUZZ_TIMEOUT (s per input, default 10), FUZZ_RSS_MB (default 2048),
# FUZZ_MALLOC_MB (largest single allocation, default 128), FUZZ_MAX_LEN
# (default 4096), FUZZ_JOBS (cargo build jobs).
#
# Per target: the seeds are written by the target itself (fuzz/seeds/, made
# from the code that writes each format), the working corpus is kept in
# fuzz/corpus/ (both ignored by git), committed inputs that once failed are
# in fuzz/regressions/ and replayed first, and a failing input is saved in
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

secs=${1:-20}
shift || true
sanitizer=${FUZZ_SANITIZER:-address}
timeout=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}
malloc_mb=${FUZZ_MALLOC_MB:-128}
max_len=${FUZZ_MAX_LEN:-4096}
triple=x86_64-unknown-linux-gnu
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version 0.13.2
fi

cd fuzz
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${#targets[@]} fuzz targets (sanitizer: $sanitizer)"
build_start=$(date +%s)
jobs=()
if [ -n "${FUZZ_JOBS:-}" ]; then jobs=(--jobs "$FUZZ_JOBS"); fi
# One cargo invocation builds every target (shared dependencies, parallel).
cargo fuzz build --sanitizer "$sanitizer" --codegen-units 16 "${jobs[@]}"
echo "   built in $(($(date +%s) - build_start)) s"

bin_dir=target/$triple/release
summary=()
failed=0
passed=0
for t in "${targets[@]}"; do
    bin=$bin_dir/$t
    log=$root/fuzz/artifacts/$t.log
    mkdir -p "corpus/$t" "artifacts/$t"
    rm -rf "seeds/$t"
    VAULT_FUZZ_SEEDS="seeds/$t" "$bin" >/dev/null 2>&1 || {
        echo "$t: could not write its seeds" >&2
        VAULT_FUZZ_SEEDS="seeds/$t" "$bin" || true
        exit 1
    }
    dirs=("corpus/$t" "seeds/$t")
    if [ -d "regressions/$t" ]; then dirs+=("regressions/$t"); fi
    echo "== $t: ${secs}s"
    rc=0
    "$bin" "${dirs[@]}" \
        -max_total_time="$secs" -timeout="$timeout" \
        -rss_limit_mb="$rss_mb" -malloc_limit_mb="$malloc_mb" \
        -max_len="$max_len" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
    corpus=$(find "corpus/$t" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then
        result=ok
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        if grep -q 'ERROR: libFuzzer: timeout' "$log"; then
            result=TIMEOUT
        elif grep -qE 'out-of-memory|malloc\(' "$log"; then
            result=OUT-OF-MEMORY
        elif grep -q 'AddressSanitizer' "$log"; then
            result=SANITIZER
        else
            result=CRASH
        fi
        echo "---- $t: $result (log: $log)"
        grep -E 'panicked at|ERROR:|SUMMARY|Test unit written|^[^ ].*assert' "$log" | head -20 || true
    fi
    summary+=("$(printf '%-16s %-14s runs %-10s %-22s corpus %-6s' "$t" "$result" "${runs:-?}" "${cov:-cov: ?}" "$corpus")")
done

echo
echo "== fuzz summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
echo "fuzz: $passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
    echo "FAILED: a failing input is in fuzz/artifacts/<target>/; replay it with"
    echo "  RUSTC_BOOTSTRAP=1 cargo fuzz run --codegen-units 16 <target> artifacts/<target>/<file>  (in fuzz/)"
    exit 1
fi
