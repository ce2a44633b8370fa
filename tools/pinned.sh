# Shared by the build scripts of tools/ (sourced): a tool built from the Go modules pinned in the
# go.mod beside its script goes to target/<tool>/<version>/bin, one build at a time per machine,
# and is built again when go.mod or go.sum changed since (another version of any module).
#
#   here=…; root=…; source "$root/tools/pinned.sh"
#   pinned_dir <tool> <version> [file...]  # sets $out and $pins (of the files; go.mod and go.sum
#                                          # beside the script by default); holds the lock until the end
#   pinned_fresh <binary>...           # true when each is there and built from these pins
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
