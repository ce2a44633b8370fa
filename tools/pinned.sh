# Shared by the build scripts of tools/ (sourced): a tool built from the Go modules pinned in the
# go.mod beside its script goes to target/<tool>/<version>/bin, one build at a time per machine,
# and is built again when go.mod or go.sum changed since (another version of any module).
#
#   here=…; root=…; source "$root/tools/pinned.sh"
#   pinned_dir <tool> <version> [file...]  # sets $out and $pins (of the files; go.mod and go.sum
#                                          # beside the script by default); holds the lock until the end
#   pinned_fresh <binary>...           # true when each is there and built from these pins
#   pinned_build <name> <dir> <package> [ldflags]  # go build (in <dir>) into $out/<name>, with progress
#   pinned_done                        # records the pins once everything is built
#   need_go <what>                     # stops, saying what to install, without a Go toolchain

pinned_dir() {
  out="${CARGO_TARGET_DIR:-$root/target}/$1/$2/bin"
  mkdir -p "$out"
  # One build at a time per machine (test binaries and `local` may ask at once).
  exec 9>"$out/.lock"
  flock 9
  shift 2
  [ $# -gt 0 ] || set -- "$here/go.mod" "$here/go.sum"
  pins="$(cat "$@" | sha256sum | cut -d' ' -f1)"
}

pinned_fresh() {
  if [ "$(cat "$out/.pins" 2>/dev/null)" != "$pins" ]; then
    for binary in "$@"; do rm -f "$out/$binary"; done
    return 1
  fi
  for binary in "$@"; do [ -x "$out/$binary" ] || return 1; done
}

pinned_done() {
  echo "$pins" > "$out/.pins"
}

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    echo "error: the Go toolchain is needed to build $1: install Go 1.26 or newer (the project's" >&2
    echo "       machine image has it in /usr/local/go/bin), put it on PATH and run again" >&2
    exit 1
  fi
}

pinned_build() {
  local name="$1" dir="$2" pkg="$3" ldflags="${4:-}"
  if [ -x "$out/$name" ]; then return 0; fi
  echo "==> building $name $version from $pkg (Go $(go env GOVERSION))" >&2
  local started=$SECONDS
  # -v names each package as it compiles: count them so that a long first build shows progress.
  if ! (cd "$dir" && go build -v -trimpath -buildvcs=false -ldflags "-s -w$ldflags" -o "$out/$name.partial" "$pkg") 2>&1 |
    awk -v name="$name" '/^(go: |#|.*\.go:[0-9])/ { print; next } { n++; if (n % 250 == 0) printf "    %s: %d packages compiled\n", name, n }' >&2
  then
    echo "error: building $name failed (output above)" >&2
    exit 1
  fi
  mv "$out/$name.partial" "$out/$name"
  echo "    $name built in $((SECONDS - started)) s" >&2
}
