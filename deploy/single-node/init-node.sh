#!/usr/bin/env bash
# Prepares the state directory of a single vault node: a SoftHSM2 token
# with a random PIN, the identity key that signs owner tokens, and TLS
# certificates from a CA of its own (tls/ca.pem is what clients trust;
# HSM_VAULT_TLS_HOSTS adds names or addresses, space-separated, that the
# server certificate is valid for besides localhost, 127.0.0.1 and ::1).
#
#   init-node.sh STATE_DIR
set -euo pipefail
state=${1:?usage: init-node.sh STATE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/node.env"
mkdir -p "$state"
"$here/../../softhsm-config/scripts/init-token.sh" "$state/token" "$HSM_VAULT_TOKEN_LABEL"
"${VAULT_BIN:-vault}" token keygen --out-dir "$state/identity"
cp "$state/identity/jwks.json" "$state/jwks.json"
hosts=()
for h in ${HSM_VAULT_TLS_HOSTS:-}; do hosts+=(--host "$h"); done
"${FLEET_BIN:-fleet}" certs --out "$state/tls" --node-id 1 "${hosts[@]}"
