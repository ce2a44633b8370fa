#!/usr/bin/env bash
# Builds the nats-server that the tests and `voucher-dev local` run, from the upstream module
# pinned in go.mod (github.com/nats-io/nats-server/v2), into target/nats/<version>/bin, once
# per machine. Prints that directory on its last line.
#
#   bash tools/nats/build.sh                  # build what is missing (~1 min on 2 cores)
#   NATS_BIN_DIR=$(bash tools/nats/build.sh | tail -1)
#
# Why not the distribution's package: cross-Sovereign vouchers need JetStream domains, leaf
# nodes and KV compare-and-set as current releases have them (2.10 or later; Debian ships 2.9).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

version="$(awk '$1 == "require" && $2 == "github.com/nats-io/nats-server/v2" { print $3; exit }' "$here/go.mod")"
[ -n "$version" ] || { echo "error: no nats-server version in $here/go.mod" >&2; exit 1; }
source "$root/tools/pinned.sh"
pinned_dir nats "$version"
if pinned_fresh nats-server; then
  echo "$out"
  exit 0
fi
need_go nats-server

# The version string nats-server reports (`nats-server --version`, /varz) is its module's own.
pinned_build nats-server "$here" github.com/nats-io/nats-server/v2
pinned_done
echo "$out"
