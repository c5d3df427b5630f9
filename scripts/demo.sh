#!/usr/bin/env bash
# The main job, end to end on one machine: builds the vault, starts a local
# fleet of 5 vault nodes in 3 emulated regions (one SoftHSM2 token each, the
# domain keys cloned by the ceremony, TLS certificates from a fleet CA of
# its own), backs a file up and restores it over TLS, with a password
# through the fleet and with a 64-digit key, and shows the fleet surviving
# the loss of its leader. Everything lives in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh --node
cargo build --locked --bins -q

bin=$(pwd)/target/debug
fleet() { "$bin/fleet" --dir "$demo/fleet" "$@"; }
vault() { "$bin/vault" "$@"; }
demo=$(pwd)/.demo
if [ -f "$demo/fleet/state.json" ]; then fleet down >/dev/null 2>&1 || true; fi
rm -rf "$demo"; mkdir -p "$demo"
dashboard_pid=
trap 'fleet down >/dev/null 2>&1 || true; [ -z "$dashboard_pid" ] || kill "$dashboard_pid" 2>/dev/null || true' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. a local fleet: 5 nodes, 3 regions, one SoftHSM2 token each"
fleet up --fleet-file deploy/local-fleet/fleet.toml
for _ in $(seq 1 100); do fleet status | awk '$6 == "leader"' | grep -q . && break; sleep 0.1; done
fleet status
fleet dashboard --listen 127.0.0.1:9470 > "$demo/dashboard.out" 2>&1 &
dashboard_pid=$!
echo "live dashboard: http://127.0.0.1:9470/ (while the demo runs; JSON at /api/fleet)"

export VAULT_PUBLIC_KEY=$demo/fleet/vault.pub
export VAULT_CA_CERT=$demo/fleet/tls/ca.pem   # the client checks each node's TLS certificate
account=alice@example.org
vault token issue --signing-key "$demo/fleet/identity/identity.key" --account "$account" > "$demo/alice.token"
head -c $((5 * 1024 * 1024)) /dev/urandom > "$demo/chats.db"

step "2. backup with a password, through the node in ap-south"
echo "correct horse battery staple" | VAULT_ENDPOINT=https://127.0.0.1:7705 vault backup create \
  --account "$account" --token-file "$demo/alice.token" --password-stdin \
  --in "$demo/chats.db" --out "$demo/chats.enc"

step "3. a wrong password costs a guess"
echo "wrong guess" | VAULT_ENDPOINT=https://127.0.0.1:7702 vault backup restore --account "$account" \
  --password-stdin --in "$demo/chats.enc" --out "$demo/restored.db" || echo "(refused, as it should be)"
echo "the answer to a guess gives no count (a stranger must not tell real accounts from unknown ones);"
echo "the owner sees it with their token:"
VAULT_ENDPOINT=https://127.0.0.1:7702 vault status --account "$account" --token-file "$demo/alice.token"

step "4. the leader crashes (kill -9)"
leader=$(fleet status | awk '$6 == "leader" { print $1 }')
fleet stop-node --id "$leader" --kill
survivor=$(( leader % 5 + 1 ))
export VAULT_ENDPOINT=https://127.0.0.1:770$survivor

step "5. restore with the right password, through node $survivor"
for attempt in $(seq 1 50); do
  if echo "correct horse battery staple" | vault backup restore --account "$account" \
       --password-stdin --in "$demo/chats.enc" --out "$demo/restored.db" 2> "$demo/restore.err"; then
    break
  fi
  grep -q "Unavailable" "$demo/restore.err" || { cat "$demo/restore.err"; exit 1; }
  sleep 0.2   # the group is electing a new leader
done
cat "$demo/restore.err"
cmp "$demo/chats.db" "$demo/restored.db" && echo "restored file is identical"
vault status --account "$account" --token-file "$demo/alice.token"
fleet status

step "metrics: every node serves Prometheus metrics (counters since it started)"
sleep 1
for addr in $(grep -o '"metrics_addr": *"[^"]*"' "$demo/fleet/state.json" | cut -d'"' -f4); do
  if scrape=$(curl -sf "http://$addr/metrics"); then
    echo "$addr: $(grep -E '^vault_(guesses_charged|recoveries|lockouts)_total|^vault_raft_is_leader' <<< "$scrape" | tr '\n' ' ')"
  else
    echo "$addr: no answer (the killed node)"
  fi
done
curl -s -o /dev/null -w "dashboard answered HTTP %{http_code}\n" http://127.0.0.1:9470/api/fleet

step "6. backup with a 64-digit key instead of the vault"
vault backup create --no-vault --in "$demo/chats.db" --out "$demo/chats-key.enc" > "$demo/key.txt"
echo "key: $(cat "$demo/key.txt")"
vault backup restore --no-vault --key-stdin --in "$demo/chats-key.enc" \
  --out "$demo/restored-key.db" < "$demo/key.txt"
cmp "$demo/chats.db" "$demo/restored-key.db" && echo "restored file is identical"

step "7. turn encrypted backup off (password required)"
echo "correct horse battery staple" | vault backup disable --account "$account" \
  --token-file "$demo/alice.token" --password-stdin
vault status --account "$account" --token-file "$demo/alice.token"

step "done: backup and restore worked end to end on the fleet (node logs: .demo/fleet/node-*/node.log)"
