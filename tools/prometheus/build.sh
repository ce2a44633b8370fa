#!/usr/bin/env bash
# Builds the Prometheus server and promtool that the alert and dashboard tests and `voucher-dev
# local --prometheus` run, from the upstream module pinned in go.mod
# (github.com/prometheus/prometheus), into target/prometheus/<version>/bin, once per machine.
# Prints that directory on its last line.
#
#   bash tools/prometheus/build.sh            # build what is missing
#   PROMETHEUS_BIN_DIR=$(bash tools/prometheus/build.sh | tail -1)
#
# Built with the tag remove_all_sd: only static, file and HTTP service discovery (a loopback
# target needs no more; a third of the packages). No web UI assets (the builtinassets tag needs
# an npm build the module does not ship): the HTTP API, /-/ready and /metrics work without them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

version="$(awk '$1 == "require" && $2 == "github.com/prometheus/prometheus" { print $3; exit }' "$here/go.mod")"
[ -n "$version" ] || { echo "error: no prometheus version in $here/go.mod" >&2; exit 1; }
source "$root/tools/pinned.sh"
pinned_dir prometheus "$version"
if pinned_fresh prometheus promtool; then
  echo "$out"
  exit 0
fi
need_go "Prometheus and promtool"

# v0.3MM.P is Prometheus 3.MM.P: the version the binaries report (prometheus --version, /status).
release="${version#v0.}"
release="${release:0:1}.$((10#${release:1:2})).${version##*.}"
stamp=""
for field in "Version=$release" "Revision=" "Branch=" "BuildUser=voucher-operator" "BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"; do
  stamp+=" -X github.com/prometheus/common/version.$field"
done
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-tags=remove_all_sd"
pinned_build prometheus "$here" github.com/prometheus/prometheus/cmd/prometheus "$stamp"
pinned_build promtool "$here" github.com/prometheus/prometheus/cmd/promtool "$stamp"
pinned_done
echo "$out"
