#!/usr/bin/env bash
# Builds what the Flux tests and `voucher-dev local --gitops` run — Flux's source-controller and
# kustomize-controller from their upstream modules, and a loopback Git server (git-server/, on
# fluxcd/gitkit) — into target/flux/<version>/bin, once per machine, with the controllers' CRDs
# from the same module versions in target/flux/<version>/crds. Prints the bin directory last.
#
#   bash tools/flux/build.sh                  # build what is missing (first run: ~5 min on 2 cores)
#   FLUX_BIN_DIR=$(bash tools/flux/build.sh | tail -1)
#
# One module per controller (source-controller/, kustomize-controller/): the two upstream go.mod
# files pin ~70 shared modules at different versions, and one module would build each controller
# with the other's. A change of any go.mod, go.sum or of git-server/main.go rebuilds all three.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

version_of() { # module directory, module path
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$here/$1/go.mod"
}
version="$(version_of source-controller github.com/fluxcd/source-controller)"
kc_version="$(version_of kustomize-controller github.com/fluxcd/kustomize-controller)"
[ -n "$version" ] && [ "$version" = "$kc_version" ] || {
  echo "error: tools/flux pins source-controller '$version' and kustomize-controller '$kc_version': pin one Flux release" >&2
  exit 1
}
source "$root/tools/pinned.sh"
pinned_dir flux "$version" "$here"/*/go.mod "$here"/*/go.sum "$here/git-server/main.go"
crds="$out/../crds"
if pinned_fresh source-controller kustomize-controller git-server && [ -f "$crds/.complete" ]; then
  echo "$out"
  exit 0
fi
need_go "Flux's source-controller and kustomize-controller"

pinned_build git-server "$here/git-server" .
pinned_build source-controller "$here/source-controller" github.com/fluxcd/source-controller
pinned_build kustomize-controller "$here/kustomize-controller" github.com/fluxcd/kustomize-controller

# The CRDs of exactly these versions, from the module sources the builds used. All six of
# source-controller's: it watches five kinds and exits when one is missing.
rm -rf "$crds" && mkdir -p "$crds"
for module in source-controller kustomize-controller; do
  dir="$(cd "$here/$module" && go list -m -f '{{.Dir}}' "github.com/fluxcd/$module")"
  cp "$dir"/config/crd/bases/*.yaml "$crds/"
done
chmod u+w "$crds"/*.yaml
touch "$crds/.complete"
pinned_done
echo "$out"
