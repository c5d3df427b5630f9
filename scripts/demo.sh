#!/usr/bin/env bash
# The main job, end to end on one machine: builds the vault, starts a node
# on a fresh SoftHSM2 token, and backs a file up and restores it, once with
# a vault password and once with a 64-digit key. Everything lives in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo build --locked --bins -q

bin=$(pwd)/target/debug
export HSM_VAULT_BIN=$bin/hsm-vault VAULT_BIN=$bin/vault
export HSM_VAULT_LISTEN=${HSM_VAULT_LISTEN:-127.0.0.1:7700}
demo=$(pwd)/.demo
rm -rf "$demo"; mkdir -p "$demo"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. a vault node on its own SoftHSM2 token"
deploy/single-node/init-node.sh "$demo/node"
deploy/single-node/run-node.sh "$demo/node" > "$demo/node.out" 2> "$demo/node.log" &
node_pid=$!
trap 'kill $node_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "listening on" "$demo/node.out" 2>/dev/null && break
  kill -0 $node_pid 2>/dev/null || { cat "$demo/node.log"; exit 1; }
  sleep 0.1
done
grep "listening on" "$demo/node.out"
echo "OPAQUE public key (clients pin it): $(cat "$demo/node/vault.pub")"

export VAULT_ENDPOINT=http://$HSM_VAULT_LISTEN VAULT_PUBLIC_KEY=$demo/node/vault.pub
account=alice@example.org
"$VAULT_BIN" token issue --signing-key "$demo/node/identity/identity.key" \
  --account "$account" > "$demo/alice.token"
head -c $((5 * 1024 * 1024)) /dev/urandom > "$demo/chats.db"

step "2. backup with a password: the key goes to the vault, the file is encrypted"
echo "correct horse battery staple" | "$VAULT_BIN" backup create --account "$account" \
  --token-file "$demo/alice.token" --password-stdin --in "$demo/chats.db" --out "$demo/chats.enc"
"$VAULT_BIN" status --account "$account" --token-file "$demo/alice.token"

step "3. a wrong password costs a guess"
echo "wrong guess" | "$VAULT_BIN" backup restore --account "$account" --password-stdin \
  --in "$demo/chats.enc" --out "$demo/restored.db" || echo "(refused, as it should be)"

step "4. restore with the right password"
echo "correct horse battery staple" | "$VAULT_BIN" backup restore --account "$account" \
  --password-stdin --in "$demo/chats.enc" --out "$demo/restored.db"
cmp "$demo/chats.db" "$demo/restored.db" && echo "restored file is identical"
"$VAULT_BIN" status --account "$account" --token-file "$demo/alice.token"

step "5. backup with a 64-digit key instead of the vault"
"$VAULT_BIN" backup create --no-vault --in "$demo/chats.db" --out "$demo/chats-key.enc" > "$demo/key.txt"
echo "key: $(cat "$demo/key.txt")"
"$VAULT_BIN" backup restore --no-vault --key-stdin --in "$demo/chats-key.enc" \
  --out "$demo/restored-key.db" < "$demo/key.txt"
cmp "$demo/chats.db" "$demo/restored-key.db" && echo "restored file is identical"

step "6. turn encrypted backup off (password required)"
echo "correct horse battery staple" | "$VAULT_BIN" backup disable --account "$account" \
  --token-file "$demo/alice.token" --password-stdin
"$VAULT_BIN" status --account "$account" --token-file "$demo/alice.token"

step "done: backup and restore worked end to end (node log: .demo/node.log)"
