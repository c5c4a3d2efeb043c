#!/usr/bin/env bash
# docker-compose for users: `make compose-up` / `make compose-down`.
#
#   scripts/compose.sh up     build the image (no registry: scripts/docker-image.sh; or
#                             SECURELLM_IMAGE_BUILD=registry for `compose build` from ./Dockerfile),
#                             start the four services, wait until all four are healthy, print the
#                             OpenAI URL and the bootstrap API key
#   scripts/compose.sh down   stop and remove the containers (the data volume stays;
#                             SECURELLM_COMPOSE_DOWN_ARGS=-v removes it too)
#   scripts/compose.sh wait   wait until all four are healthy (what `up --wait` does in Compose v2)
#
#   SECURELLM_IMAGE_BUILD  local (default) | registry | none (use $SECURELLM_IMAGE as it is)
#   BIN                    binaries for the local build (default ./target/release, built if missing)
#   SECURELLM_MODELS       models folder (default ./models; created with a demo model when empty)
#   SECURELLM_COMPOSE_FILES  compose files, space-separated (default docker-compose.yml; add
#                          docker-compose.gpu.yml on an NVIDIA host)
#   COMPOSE_PROJECT_NAME, SECURELLM_HTTP_PUBLISH, SECURELLM_IMAGE: as docker-compose.yml reads them
#   SECURELLM_COMPOSE_WAIT_S  how long `up` waits for healthy (default 180)
#
# Compose v2 (`docker compose`) is used when installed, with `up --wait`; Compose v1
# (`docker-compose`, e.g. Debian 12's 1.29) has no --wait, so `up -d` is followed by the same wait
# done here: every service's container running and its healthcheck healthy.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SERVICES=(vram-scheduler registry backend-manager securellm-gateway)
WAIT_S="${SECURELLM_COMPOSE_WAIT_S:-180}"

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
  V2=1
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
  V2=0
else
  echo "neither \`docker compose\` nor \`docker-compose\` is installed" >&2
  exit 1
fi
for f in ${SECURELLM_COMPOSE_FILES:-docker-compose.yml}; do
  COMPOSE+=(-f "$f")
done

# wait_healthy: all four containers healthy within WAIT_S seconds; on failure, their states and
# the last log lines of the ones that are not healthy.
wait_healthy() {
  local deadline=$(( $(date +%s) + WAIT_S )) s id state bad
  while :; do
    bad=""
    for s in "${SERVICES[@]}"; do
      id="$("${COMPOSE[@]}" ps -q "$s" 2>/dev/null || true)"
      state="$( [ -n "$id" ] && docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" 2>/dev/null || echo missing)"
      [ "$state" = "running/healthy" ] || bad+=" $s=$state"
    done
    [ -z "$bad" ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "not healthy after ${WAIT_S} s:$bad" >&2
      "${COMPOSE[@]}" ps >&2 || true
      "${COMPOSE[@]}" logs --tail 20 >&2 || true
      return 1
    fi
    sleep 1
  done
}

up() {
  local build="${SECURELLM_IMAGE_BUILD:-local}"
  case "$build" in
    local)
      if [ -z "${BIN:-}" ]; then
        export BIN="$ROOT/target/release"
        for b in vram-scheduler registry backend-manager securellm-gateway securellm; do
          [ -x "$BIN/$b" ] || { make -C "$ROOT" release; break; }
        done
      fi
      SECURELLM_IMAGE="$("$ROOT/scripts/docker-image.sh" image)"
      export SECURELLM_IMAGE
      ;;
    registry) "${COMPOSE[@]}" build ;;
    none) ;;
    *) echo "SECURELLM_IMAGE_BUILD must be local, registry or none, got $build" >&2; exit 2 ;;
  esac
  # The models folder: the demo model when none is given and ./models is empty (as `make run`),
  # readable by the containers' user.
  if [ -z "${SECURELLM_MODELS:-}" ]; then
    mkdir -p "$ROOT/models"
    if [ -z "$(ls -A "$ROOT/models")" ]; then
      docker run --rm --network none -v "$ROOT/models:/out" --user "$(id -u):$(id -g)" \
        --entrypoint securellm "${SECURELLM_IMAGE:-securellm:latest}" demo-model /out/tiny.gguf >/dev/null
      echo "no SECURELLM_MODELS set: serving the generated demo model (random weights, gibberish output)"
    fi
  fi
  local start=$(date +%s%N)
  if [ "$V2" = 1 ]; then
    "${COMPOSE[@]}" up -d --no-build --wait
  else
    "${COMPOSE[@]}" up -d --no-build
    wait_healthy
  fi
  local ms=$(( ($(date +%s%N) - start) / 1000000 ))
  local port key
  port="$("${COMPOSE[@]}" port securellm-gateway 8088 | tail -n 1)"
  key="$("${COMPOSE[@]}" exec -T securellm-gateway cat /data/gateway/api-key | head -n 1)"
  cat <<EOF

SecureLLM is up in containers (all four healthy after ${ms} ms).
  OpenAI base URL: http://$port/v1
  API key:         $key   (in the data volume: /data/gateway/api-key)

  curl http://$port/v1/models -H "Authorization: Bearer $key"
  ${COMPOSE[*]} exec securellm-gateway securellm status
  ${COMPOSE[*]} exec securellm-gateway securellm audit verify
  make compose-down   (state stays in the data volume)
EOF
}

case "${1:-}" in
  up) up ;;
  wait) wait_healthy ;;
  down) "${COMPOSE[@]}" down ${SECURELLM_COMPOSE_DOWN_ARGS:-} ;;
  *) echo "usage: $0 up|down|wait" >&2; exit 2 ;;
esac
