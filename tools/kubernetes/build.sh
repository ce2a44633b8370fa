#!/usr/bin/env bash
# Builds the real Kubernetes control plane that the tests and `voucher-dev local` run —
# kube-apiserver, etcd and kubectl, from the upstream Go modules pinned in go.mod — into
# target/kubernetes/<version>/bin, once per machine. Prints that directory on its last line.
#
#   bash tools/kubernetes/build.sh            # build what is missing (first run: ~7 min on 2 cores)
#   KUBE_BIN_DIR=$(bash tools/kubernetes/build.sh | tail -1)
#
# Go's module and build caches (~/go/pkg/mod, ~/.cache/go-build) make a rebuild after
# `cargo clean` take well under a minute. A change of go.mod or go.sum (another version of
# any module) rebuilds all three.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# The version is the one go.mod pins; the binaries report it (kubectl version, /version).
version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")"
[ -n "$version" ] || { echo "error: no k8s.io/kubernetes version in $here/go.mod" >&2; exit 1; }
source "$root/tools/pinned.sh"
pinned_dir kubernetes "$version"
if pinned_fresh etcd kube-apiserver kubectl; then
  echo "$out"
  exit 0
fi
need_go "kube-apiserver, etcd and kubectl"

minor="${version#v1.}"; minor="${minor%%.*}"
# What Kubernetes' own release build stamps (hack/lib/version.sh); "archive" is its tree state
# for a build from a source archive rather than a git checkout (which also has no commit to name).
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  stamp+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=archive -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
done

pinned_build etcd "$here" ./etcd "$stamp"
pinned_build kube-apiserver "$here" k8s.io/kubernetes/cmd/kube-apiserver "$stamp"
pinned_build kubectl "$here" k8s.io/kubernetes/cmd/kubectl "$stamp"
pinned_done
echo "$out"
