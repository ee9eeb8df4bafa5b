#!/usr/bin/env bash
# A 3-node ham mesh (a, b, c) in containers on a private Docker network.
#
#   deploy/mesh.sh up     build the image (deploy/build-image.sh; HAM_NO_BUILD=1 skips it
#                         when the image exists), make certificates in deploy/.certs if
#                         missing, start the mesh and wait until every node sees a, b, c up
#   deploy/mesh.sh show   ham nodes, ham status and ham --node b|c status, run in node a
#   deploy/mesh.sh down   remove the containers and the network (the image and the
#                         certificates stay)
#   deploy/mesh.sh demo   up, show, down
#
# Compose project: ${HAM_PROJECT:-ham}; image: ${HAM_IMAGE:-ham:local}.
set -euo pipefail
cd "$(dirname "$0")"
deploy=$PWD
project=${HAM_PROJECT:-ham}
export HAM_IMAGE=${HAM_IMAGE:-ham:local}
export HAM_CERTS=${HAM_CERTS:-$deploy/.certs}
nodes=(a b c)

die() {
  echo "mesh: FAILED: $*" >&2
  exit 1
}
compose() { docker-compose -p "$project" -f "$deploy/docker-compose.yml" "$@"; }
# `docker-compose exec` without -T wants a terminal.
tty_flag() { [ -t 0 ] && [ -t 1 ] || echo -T; }
in_node() {
  local n=$1
  shift
  # shellcheck disable=SC2046
  compose exec $(tty_flag) "$n" "$@"
}

certs() {
  mkdir -p "$HAM_CERTS"
  # The CA's key lives here: keep the directory out of git.
  [ -f "$HAM_CERTS/.gitignore" ] || echo '*' >"$HAM_CERTS/.gitignore"
  # `ham cert` from the image, as the calling user, so the files are ours.
  local run=(docker run --rm --network none --user "$(id -u):$(id -g)"
    -v "$HAM_CERTS:/certs" "$HAM_IMAGE")
  if [ ! -f "$HAM_CERTS/ca.crt" ]; then
    "${run[@]}" /bin/ham cert init-ca --dir /certs >/dev/null || die "ham cert init-ca"
  fi
  for n in "${nodes[@]}"; do
    if [ ! -f "$HAM_CERTS/$n.crt" ] || [ ! -f "$HAM_CERTS/$n.key" ]; then
      "${run[@]}" /bin/ham cert issue "$n" --dir /certs >/dev/null || die "ham cert issue $n"
    fi
  done
}

# Waits until every node lists a, b, c as up.
wait_mesh() {
  local deadline=$((SECONDS + ${1:-60})) n json
  while :; do
    local ok=1
    for n in "${nodes[@]}"; do
      json=$(compose exec -T "$n" ham nodes --json 2>/dev/null) || json='{}'
      if ! python3 -c '
import json, sys
nodes = {n["name"]: n["state"] for n in json.loads(sys.argv[1]).get("nodes", [])}
sys.exit(0 if all(nodes.get(x) == "up" for x in "abc") else 1)' "$json"; then
        ok=0
        break
      fi
    done
    [ "$ok" = 1 ] && return 0
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "mesh: node $n sees: $json" >&2
      compose logs --tail 20 >&2 || true
      die "the mesh did not form"
    fi
    sleep 0.5
  done
}

up() {
  command -v docker-compose >/dev/null || die "docker-compose (v1) is not on PATH"
  docker info >/dev/null 2>&1 || die "no Docker engine is reachable"
  if [ "${HAM_NO_BUILD:-0}" = 1 ] && docker image inspect "$HAM_IMAGE" >/dev/null 2>&1; then
    :
  else
    ./build-image.sh
  fi
  certs
  compose up -d || die "docker-compose up"
  echo "mesh: waiting for a, b, c to see each other up"
  wait_mesh 60
  echo "mesh: up (project $project): deploy/mesh.sh show | deploy/mesh.sh down"
}

show() {
  echo "\$ docker-compose -p $project exec a ham nodes"
  in_node a ham nodes
  echo
  echo "\$ docker-compose -p $project exec a ham status"
  in_node a ham status
  for n in b c; do
    echo
    echo "\$ docker-compose -p $project exec a ham --node $n status   # answered by $n, through the mesh"
    in_node a ham --node "$n" status
  done
}

down() {
  compose down --remove-orphans --volumes --timeout 10
}

case "${1:-}" in
  up) up ;;
  show) show ;;
  down) down ;;
  demo)
    trap down EXIT
    up
    echo
    show
    echo
    ;;
  *)
    echo "usage: deploy/mesh.sh up|show|down|demo" >&2
    exit 2
    ;;
esac
