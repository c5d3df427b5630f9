#!/usr/bin/env bash
# Prepares the state directory of a single vault node: a SoftHSM2 token
# with a random PIN, and the identity key that signs owner tokens.
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
cp "$state/identity/identity.pub" "$state/identity.pub"
