#!/usr/bin/env bash
# Runs one vault node from a state directory made by init-node.sh.
#
#   run-node.sh STATE_DIR [extra hsm-vault flags]
#
# STATE_DIR holds token/ (SoftHSM config, tokens, user.pin), data/ (sled),
# jwks.json (the identity service's token-signing keys), tls/ (the server
# certificate; clients trust tls/ca.pem) and receives vault.pub (the OPAQUE
# public key clients pin).
set -euo pipefail
state=$(cd "${1:?usage: run-node.sh STATE_DIR}" && pwd); shift
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/node.env"
export SOFTHSM2_CONF="$state/token/softhsm2.conf"
exec "${HSM_VAULT_BIN:-hsm-vault}" \
  --listen "$HSM_VAULT_LISTEN" \
  --data-dir "$state/data" \
  --token-label "$HSM_VAULT_TOKEN_LABEL" \
  --pin-file "$state/token/user.pin" \
  --auth-jwks "$state/jwks.json" \
  --publish-key "$state/vault.pub" \
  --tls-cert "$state/tls/node-1/server.pem" \
  --tls-key "$state/tls/node-1/server.key" \
  "$@"
