#!/usr/bin/env bash
# The whole gate, the same locally and in CI: formatting, lints, and every
# test (unit, SoftHSM partition tests, end-to-end tests with real vault
# processes). nextest runs each test in its own process, which SoftHSM needs
# (one configuration per process).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
# The kryoptic pass comes last; fail now, in seconds, if its module could not
# be built (libclang for bindgen, perl, make, cc), not after the SoftHSM pass.
scripts/kryoptic.sh --check || {
  echo "FAILED: the kryoptic module's build prerequisites are missing (above)" >&2; exit 1; }
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real binaries: build them all first (cargo
# only builds a package's binaries for its own integration tests).
cargo build --workspace --bins --locked
# The kryoptic module too, before the long SoftHSM pass (a failing build costs
# minutes, not the whole pass). Built once per checkout (about 3.5 minutes on
# 2 cores: OpenSSL from source), kept in kryoptic-module/target.
(cd kryoptic-module && cargo fmt -- --check)
kryoptic_module=$(scripts/kryoptic.sh)
# Deployment files: Kubernetes manifests against the API schemas, the
# systemd unit, the start script (see the script).
scripts/validate-deploy.sh
cargo nextest run --workspace --locked --no-fail-fast
# The same suite against a second PKCS#11 implementation, kryoptic (see
# ARCHITECTURE.md, *Second PKCS#11 implementation*), with the module built
# above; the pass itself takes about three minutes.
# kryoptic 1.5 cannot mark any key CKA_TRUSTED, so no cloning ceremony is
# possible there (the domain keys stay CKA_WRAP_WITH_TRUSTED; the vault
# refuses with a clear error, which hsm-vault's ceremony tests check on
# kryoptic). Replica groups and multi-node fleets are still tested: the test
# harness and `fleet up` import the same domain keys into every kryoptic
# token at provisioning (hsm_vault::partition::import, test fleets only).
# Left out: only the tests that need a ceremony itself, the three ceremony
# tests and the fleet tests that enroll tokens over the wire (ExportKeys:
# replace/add nodes, and enrollment across machines), which kryoptic refuses.
needs_cloning='test(=cloned_token_holds_the_same_domain_keys_still_protected)
  | test(=package_whose_ake_private_key_does_not_match_its_public_key_is_refused)
  | test(=token_without_the_ceremony_cannot_serve_or_decrypt)
  | test(=fleet_replace_add_remove_and_drain_keep_every_record_recoverable)
  | test(=fleet_enrolls_a_token_on_another_machine_by_request_and_package_files)'
VAULT_PKCS11=kryoptic PKCS11_MODULE="$kryoptic_module" \
  cargo nextest run --workspace --locked --no-fail-fast -E "not ($needs_cloning)"
# Every fuzz target briefly (fuzz/, see scripts/fuzz.sh): the build takes
# about 8 CPU-minutes (4–5 min on 2 idle cores), then FUZZ_SECONDS per
# target (13 targets).
scripts/fuzz.sh "${FUZZ_SECONDS:-12}"
