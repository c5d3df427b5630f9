#!/usr/bin/env bash
# Creates a SoftHSM2 token for one vault node.
#
#   init-token.sh DIR LABEL
#
# Writes DIR/softhsm2.conf (from the template) and DIR/tokens/, initializes a
# token labelled LABEL, and writes a random user PIN to DIR/user.pin (mode
# 0600). The SO PIN is random and discarded: nothing in the vault needs it.
# Export SOFTHSM2_CONF=DIR/softhsm2.conf before starting the node.
set -euo pipefail
dir=${1:?usage: init-token.sh DIR LABEL}
label=${2:?usage: init-token.sh DIR LABEL}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
sed "s|@TOKENDIR@|$dir/tokens|" "$here/templates/softhsm2.conf.in" > "$dir/softhsm2.conf"
umask 077
pin=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
so_pin=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s' "$pin" > "$dir/user.pin"
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free \
  --label "$label" --pin "$pin" --so-pin "$so_pin" >/dev/null
echo "token '$label' ready in $dir (SOFTHSM2_CONF=$dir/softhsm2.conf)"
