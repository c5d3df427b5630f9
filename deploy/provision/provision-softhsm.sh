#!/usr/bin/env bash
# Provisions the SoftHSM tokens and credentials of a whole fleet on one
# trusted, offline machine, for nodes that will run on other machines
# (systemd hosts or Kubernetes pods):
#
#   - a token per node (label vault-node-<id>, random user and SO PINs),
#   - the domain keys generated in the first node's token and cloned into
#     every other token by the vault's ceremony (wrapped under a trusted
#     transport key, never in plaintext),
#   - the identity service's and the operator's key pairs,
#   - the fleet CA and every node's and the operator's certificates, valid
#     for the fleet file's addresses and every --host given.
#
#   deploy/provision/provision-softhsm.sh FLEET_FILE OUT_DIR [--host NAME]...
#
# OUT_DIR/bundle/ then holds, per node, what to install on it; OUT_DIR/work/
# is the fleet tool's directory (every token, PIN and private key: the
# domain keys of the fleet). Both must be kept off serving hosts and
# destroyed or locked away once the nodes are installed.
#
# The fleet tool has no "provision only" command: its `fleet up` creates
# the tokens, runs the ceremony and then starts the nodes locally. Here it
# is given /bin/false as the node binary, so it stops right after the
# ceremony with "node <id> did not start", before any node touched a token.
set -euo pipefail
fleet_file=${1:?usage: provision-softhsm.sh FLEET_FILE OUT_DIR [--host NAME]...}
out=${2:?usage: provision-softhsm.sh FLEET_FILE OUT_DIR [--host NAME]...}
shift 2
fleet=${FLEET_BIN:-fleet}
command -v softhsm2-util >/dev/null || { echo "softhsm2-util is missing (apt-get install softhsm2)" >&2; exit 1; }
[ ! -e "$out" ] || { echo "$out exists: provisioning makes a new fleet, give a new directory" >&2; exit 1; }
umask 077
mkdir -p "$out/work" "$out/bundle"
work=$(cd "$out/work" && pwd)

# Certificates first, so that they carry the extra names (`fleet up` would
# issue them without).
"$fleet" certs --fleet-file "$fleet_file" --out "$work/tls" "$@" >/dev/null
if "$fleet" --dir "$work" up --fleet-file "$fleet_file" --hsm-vault-bin /bin/false \
     >"$work/up.log" 2>&1; then
  echo "fleet up did not stop as expected: see $work/up.log" >&2; exit 1
fi
grep -q "did not start" "$work/up.log" || { cat "$work/up.log" >&2; exit 1; }
grep "cloned" "$work/up.log" || true

ids=$(sed -n 's/^[[:space:]]*id[[:space:]]*=[[:space:]]*\([0-9]*\).*/\1/p' "$fleet_file")
mkdir -p "$out/bundle/keys"
cp "$work/identity/jwks.json" "$work/operator/operator.pub" "$out/bundle/keys/"
cp "$work/tls/ca.pem" "$out/bundle/keys/"
for id in $ids; do
  b="$out/bundle/node-$id"
  mkdir -p "$b/tokens" "$b/pins" "$b/tls"
  cp "$work/node-$id/user.pin" "$b/pins/node-$id.user.pin"
  for kind in server client; do
    cp "$work/tls/node-$id/$kind.pem" "$b/tls/node-$id-$kind.pem"
    cp "$work/tls/node-$id/$kind.key" "$b/tls/node-$id-$kind.key"
  done
  cp "$work/tls/ca.pem" "$b/tls/ca.pem"
  # The token directory whose label is vault-node-<id>.
  found=""
  for t in "$work"/softhsm/tokens/*/; do
    probe=$(mktemp -d)
    cp -a "$t" "$probe/"
    printf 'directories.tokendir = %s\nobjectstore.backend = file\n' "$probe" >"$probe.conf"
    if SOFTHSM2_CONF="$probe.conf" softhsm2-util --show-slots 2>/dev/null \
         | grep -Eq "Label:[[:space:]]+vault-node-$id[[:space:]]*$"; then
      cp -a "$t" "$b/tokens/"
      found=yes
    fi
    rm -rf "$probe" "$probe.conf"
    [ -n "$found" ] && break
  done
  [ -n "$found" ] || { echo "no token labelled vault-node-$id" >&2; exit 1; }
done
mkdir -p "$out/operator"
cp -r "$work/operator/so-pins" "$out/operator/"
echo "bundles in $out/bundle (per node: tokens/, pins/, tls/; public keys and CA in keys/)"
echo "SO PINs in $out/operator/so-pins (the operator's: never on a node; presented for a ceremony)"
echo "work directory with every secret: $work (move it offline or destroy it)"
