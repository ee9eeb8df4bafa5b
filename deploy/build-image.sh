#!/usr/bin/env bash
# Builds ham's container image (deploy/Dockerfile, FROM scratch) and tags it
# ${HAM_IMAGE:-ham:local}. Idempotent: cargo and the Docker layer cache rebuild only
# what changed. Quiet when all is well; on failure it says what failed and shows the
# output of the step that failed.
#
#   static release builds of hamd and ham  -> target/static (scripts/build-static: its
#                                             own target dir, so the normal one is not
#                                             invalidated)
#   init, sleeper, kill (deploy/init/*.rs)  -> target/static/init (rustc, std only)
#   build context                          -> target/static/image
#
# Needs: an x86_64 Linux host, the Rust toolchain, a Docker engine (legacy builder).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
image=${HAM_IMAGE:-ham:local}
triple=x86_64-unknown-linux-gnu
out=$root/target/static
log=$(mktemp)
trap 'rm -f "$log"' EXIT

fail() {
  echo "build-image: FAILED: $*" >&2
  if [ -s "$log" ]; then
    echo "---- output of the failed step ----" >&2
    tail -n 60 "$log" >&2
  fi
  exit 1
}
# Runs a step with its output in $log, shown only if it fails.
step() {
  local what=$1
  shift
  : >"$log"
  "$@" >"$log" 2>&1 || fail "$what (exit $?): $*"
}

[ "$(uname -sm)" = "Linux x86_64" ] || fail "needs an x86_64 Linux host (got $(uname -sm))"
command -v cargo >/dev/null || fail "cargo is not on PATH"
command -v docker >/dev/null || fail "docker is not on PATH"
docker info >/dev/null 2>&1 || fail "no Docker engine is reachable (docker info failed)"

echo "build-image: static hamd and ham (cargo, target/static)"
step "scripts/build-static" scripts/build-static
# Linked in, the C library's functions on the hot paths are laid out with hamd's own
# (the libc.a:MEMBER entries of node/hot-code.order): close(2)'s code must lie in
# .text.hot, or lld did not match the archive members and a restart maps libc's
# windows again.
hamd_bin=$out/$triple/release/hamd
read -r hot_start hot_size < <(readelf -SW "$hamd_bin" | sed -E 's/^ *\[ *[0-9]+\] *//' |
  awk '$1 == ".text.hot" { print $3, $5 }')
close_at=$(nm --defined-only "$hamd_bin" | awk '$3 == "__close" && !found { print $1; found = 1 }')
if [ -z "${hot_start:-}" ] || [ -z "$close_at" ] ||
  (( 16#$close_at < 16#$hot_start || 16#$close_at >= 16#$hot_start + 16#$hot_size )); then
  fail "the static hamd does not lay out close(2) in .text.hot (node/build.rs, node/hot-code.order)"
fi

echo "build-image: init, sleeper, kill (rustc, std only)"
mkdir -p "$out/init"
for prog in main:init sleeper:sleeper kill:kill; do
  src=deploy/init/${prog%%:*}.rs
  bin=$out/init/${prog##*:}
  if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
    step "rustc $src" rustc --edition 2021 -D warnings -C opt-level=2 -C strip=symbols \
      -C target-feature=+crt-static --target "$triple" -o "$bin" "$src"
  fi
done

echo "build-image: docker build -t $image"
ctx=$out/image
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/etc/ham" "$ctx/rootfs/run/ham" "$ctx/rootfs/tmp"
chmod 0755 "$ctx/rootfs" "$ctx/rootfs/bin" "$ctx/rootfs/etc" "$ctx/rootfs/etc/ham" \
  "$ctx/rootfs/run" "$ctx/rootfs/run/ham"
chmod 1777 "$ctx/rootfs/tmp"
for b in hamd ham; do
  # Debug info is most of a release binary's size; symbols stay for backtraces.
  if command -v strip >/dev/null; then
    step "strip $b" strip --strip-debug -o "$ctx/rootfs/bin/$b" "$out/$triple/release/$b"
  else
    cp "$out/$triple/release/$b" "$ctx/rootfs/bin/$b"
  fi
done
cp "$out/init/init" "$out/init/sleeper" "$out/init/kill" "$ctx/rootfs/bin/"
chmod 0755 "$ctx/rootfs/bin/"*
cp deploy/node.toml "$ctx/rootfs/etc/ham/node.toml"
chmod 0644 "$ctx/rootfs/etc/ham/node.toml"
cp deploy/Dockerfile "$ctx/Dockerfile"
old_id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
# The legacy builder: this engine (20.10) has no BuildKit.
DOCKER_BUILDKIT=0 step "docker build" docker build -q -t "$image" "$ctx"
id=$(docker image inspect -f '{{.Id}}' "$image")
# A rebuild leaves the previous image untagged: remove it unless something uses it.
if [ -n "$old_id" ] && [ "$old_id" != "$id" ] &&
  [ "$(docker image inspect -f '{{len .RepoTags}}' "$old_id" 2>/dev/null)" = 0 ]; then
  docker rmi "$old_id" >/dev/null 2>&1 || true
fi

# The binaries must run on an empty base: start each once in the image.
step "smoke test: hamd --version in $image" docker run --rm --network none "$image" /bin/hamd --version
step "smoke test: ham --version in $image" docker run --rm --network none "$image" /bin/ham --version
size=$(docker image inspect -f '{{.Size}}' "$image")
id=${id#sha256:}
echo "build-image: built $image (${id:0:12}, $((size / 1000000)) MB)"
