#!/usr/bin/env bash
# Start the whole SecureLLM stack on loopback: vram-scheduler, registry, backend-manager and
# securellm-gateway as four processes talking gRPC, with one data directory.
#
#   DATA_DIR            data directory (default ~/.local/share/securellm)
#   SECURELLM_MODELS    model roots, colon-separated (default: a generated tiny demo model)
#   BIN                 where the release binaries are (default ./target/release)
#   SCHEDULER_LISTEN    vram-scheduler's gRPC address (default 127.0.0.1:50051)
#   REGISTRY_LISTEN     registry's gRPC address (default 127.0.0.1:50052)
#   BACKEND_LISTEN      backend-manager's gRPC address (default 127.0.0.1:50053)
#   GATEWAY_LISTEN      securellm-gateway's gRPC address (default 127.0.0.1:50054)
#   GATEWAY_HTTP_LISTEN securellm-gateway's OpenAI HTTP address (default 127.0.0.1:8088)
#   SCHEDULER_METRICS_LISTEN, REGISTRY_METRICS_LISTEN, BACKEND_METRICS_LISTEN,
#   GATEWAY_METRICS_LISTEN
#                       each service's Prometheus /metrics address (defaults 127.0.0.1:9451 to
#                       :9454, docs/metrics.md; 127.0.0.1:0 when that service's gRPC port is 0;
#                       "off" = none)
#   SECURELLM_STACK_FILE where to tell the CLI and the MCP server about this stack (default
#                       ${XDG_STATE_HOME:-~/.local/state}/securellm/stack; removed on stop)
#   SECURELLM_INTERNAL_TOKEN_FILE
#                       the internal token the services require of each other and of the CLI
#                       (default $DATA_DIR/internal-token; the first service creates it, mode 0600)
#
# A port of 0 picks a free one (the services print the address they got; the rest of the stack
# and the printed examples use it).
#
# Prints the OpenAI base URL, an API key and working curl / Python examples once ready. Ctrl-C
# stops everything (children first, leases released, audit flushed).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"
DATA_DIR="${DATA_DIR:-${SECURELLM_DATA_DIR:-$HOME/.local/share/securellm}}"
SCHEDULER_LISTEN="${SCHEDULER_LISTEN:-127.0.0.1:50051}"
REGISTRY_LISTEN="${REGISTRY_LISTEN:-127.0.0.1:50052}"
BACKEND_LISTEN="${BACKEND_LISTEN:-127.0.0.1:50053}"
GATEWAY_LISTEN="${GATEWAY_LISTEN:-127.0.0.1:50054}"
GATEWAY_HTTP_LISTEN="${GATEWAY_HTTP_LISTEN:-127.0.0.1:8088}"
# metrics_default LISTEN PORT: the documented metrics port, or a free one when the service's own
# port is picked freely (several stacks side by side, as the tests run them).
metrics_default() {
  case "$1" in *:0) echo "127.0.0.1:0" ;; *) echo "127.0.0.1:$2" ;; esac
}
SCHEDULER_METRICS_LISTEN="${SCHEDULER_METRICS_LISTEN:-$(metrics_default "$SCHEDULER_LISTEN" 9451)}"
REGISTRY_METRICS_LISTEN="${REGISTRY_METRICS_LISTEN:-$(metrics_default "$REGISTRY_LISTEN" 9452)}"
BACKEND_METRICS_LISTEN="${BACKEND_METRICS_LISTEN:-$(metrics_default "$BACKEND_LISTEN" 9453)}"
GATEWAY_METRICS_LISTEN="${GATEWAY_METRICS_LISTEN:-$(metrics_default "$GATEWAY_LISTEN" 9454)}"
mkdir -p "$DATA_DIR/logs"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
STACK_FILE="${SECURELLM_STACK_FILE:-${XDG_STATE_HOME:-$HOME/.local/state}/securellm/stack}"
# One internal token for the four services and the CLI: nobody without it calls the scheduler,
# the registry or the backend manager around the gateway.
export SECURELLM_INTERNAL_TOKEN_FILE="${SECURELLM_INTERNAL_TOKEN_FILE:-$DATA_DIR/internal-token}"

LLAMA_SERVER="${LLAMA_SERVER:-$("$ROOT/scripts/install-llama-server.sh" | tail -n 1)}"
export LLAMA_SERVER

if [ -z "${SECURELLM_MODELS:-}" ]; then
  mkdir -p "$DATA_DIR/models"
  if [ ! -f "$DATA_DIR/models/tiny.gguf" ]; then
    "$BIN/securellm" demo-model "$DATA_DIR/models/tiny.gguf" >/dev/null
  fi
  SECURELLM_MODELS="$DATA_DIR/models"
  echo "no SECURELLM_MODELS set: serving the generated demo model (random weights, gibberish output)"
fi
export SECURELLM_MODELS

PIDS=()
# stop PID: SIGTERM, then SIGKILL if it is still running after 30 s.
stop() {
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "process $pid did not stop within 30 s of SIGTERM; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  # Once: a second Ctrl-C does not interrupt the stop (every step is bounded), nor does a failed
  # echo (a closed terminal).
  trap '' INT TERM HUP
  trap - EXIT
  set +e
  echo
  echo "stopping..."
  # The gateway first (flushes the audit log), then the manager (stops llama-server children and
  # releases leases), then the registry and the scheduler (writes its lease snapshot).
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
    stop "${PIDS[$i]}"
  done
  # The stack file, if it is still this stack's (another `make run` may have replaced it).
  if [ -f "$STACK_FILE" ] && grep -qx "PID=$$" "$STACK_FILE" 2>/dev/null; then
    rm -f "$STACK_FILE"
  fi
  echo "stopped"
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP
trap cleanup EXIT

# start NAME ARGS...: run a service, wait for its `ready` line; READY is set to that line.
# Each service runs in its own process group (set -m), so the terminal's Ctrl-C reaches only this
# script, which then stops the services one by one in the order above; were they in the
# terminal's process group, all four would get SIGINT at once and e.g. the scheduler could write
# its lease snapshot before the manager has released its leases.
start() {
  local name="$1"; shift
  local out="$DATA_DIR/logs/$name.out"
  : > "$out"
  set -m
  "$BIN/$name" "$@" < /dev/null > "$out" 2> "$DATA_DIR/logs/$name.log" &
  PIDS+=("$!")
  set +m
  for _ in $(seq 1 200); do
    if grep -q "^ready $name" "$out"; then
      READY="$(grep -m 1 "^ready $name" "$out")"
      echo "$READY"
      return 0
    fi
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
      echo "$name failed to start; see $DATA_DIR/logs/$name.log" >&2
      # The cause first (a backtrace, with RUST_BACKTRACE set, would push it out of a tail).
      grep -m 5 -E "^Error|ERROR| error" "$DATA_DIR/logs/$name.log" >&2 \
        || tail -n 20 "$DATA_DIR/logs/$name.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "$name did not become ready; see $DATA_DIR/logs/$name.log" >&2
  exit 1
}

# ready_addr KEY: the address after KEY= in the last ready line (the actual one, for port 0).
ready_addr() {
  local word
  for word in $READY; do
    case "$word" in "$1="*) echo "${word#"$1="}"; return 0 ;; esac
  done
  echo "no $1= in: $READY" >&2
  exit 1
}

# metrics_addr: the metrics address in the last ready line, or nothing (metrics off).
metrics_addr() {
  local word
  for word in $READY; do
    case "$word" in "metrics="*) echo "${word#metrics=}"; return 0 ;; esac
  done
}

start vram-scheduler --listen "$SCHEDULER_LISTEN" --data-dir "$DATA_DIR/scheduler" \
  --metrics-listen "$SCHEDULER_METRICS_LISTEN"
SCHEDULER="$(ready_addr grpc)"
SCHEDULER_METRICS="$(metrics_addr)"
grep -h "inventory:" "$DATA_DIR/logs/vram-scheduler.log" | sed 's/^.*inventory:/inventory:/' | head -n 3 || true
start registry --listen "$REGISTRY_LISTEN" --data-dir "$DATA_DIR/registry" \
  --metrics-listen "$REGISTRY_METRICS_LISTEN"
REGISTRY="$(ready_addr grpc)"
REGISTRY_METRICS="$(metrics_addr)"
start backend-manager --listen "$BACKEND_LISTEN" --scheduler "$SCHEDULER" --registry "$REGISTRY" \
  --llama-server "$LLAMA_SERVER" --metrics-listen "$BACKEND_METRICS_LISTEN"
BACKEND="$(ready_addr grpc)"
BACKEND_METRICS="$(metrics_addr)"
start securellm-gateway --listen "$GATEWAY_LISTEN" --http-listen "$GATEWAY_HTTP_LISTEN" \
  --backend "$BACKEND" --registry "$REGISTRY" --scheduler "$SCHEDULER" --data-dir "$DATA_DIR/gateway" \
  --bootstrap-key-file "$DATA_DIR/api-key" --metrics-listen "$GATEWAY_METRICS_LISTEN"
GATEWAY="$(ready_addr grpc)"
HTTP="$(ready_addr http)"
GATEWAY_METRICS="$(metrics_addr)"

KEY="$(head -n 1 "$DATA_DIR/api-key")"
MODEL="$("$BIN/securellm" --registry "$REGISTRY" models 2>/dev/null | awk 'NR==2 {print $1}' || true)"
MODEL="${MODEL:-tiny}"
# The CLI and the MCP server find this stack through the stack file (what no flag or variable
# sets); written atomically, for this user only.
mkdir -p "$(dirname "$STACK_FILE")"
(
  umask 077
  cat > "$STACK_FILE.tmp.$$" <<STACK
# written by scripts/run-stack.sh; removed when it stops
PID=$$
SECURELLM_DATA_DIR=$DATA_DIR
SECURELLM_SCHEDULER=$SCHEDULER
SECURELLM_REGISTRY=$REGISTRY
SECURELLM_BACKEND=$BACKEND
SECURELLM_GATEWAY=$GATEWAY
SECURELLM_GATEWAY_HTTP=$HTTP
SECURELLM_SCHEDULER_METRICS=$SCHEDULER_METRICS
SECURELLM_REGISTRY_METRICS=$REGISTRY_METRICS
SECURELLM_BACKEND_METRICS=$BACKEND_METRICS
SECURELLM_GATEWAY_METRICS=$GATEWAY_METRICS
SECURELLM_INTERNAL_TOKEN_FILE=$SECURELLM_INTERNAL_TOKEN_FILE
STACK
  mv -f "$STACK_FILE.tmp.$$" "$STACK_FILE"
)
# For another machine or user, the exports say the same (the defaults are the default addresses and
# ~/.local/share/securellm).
EXPORTS=""
if [ "$SCHEDULER $REGISTRY $BACKEND $GATEWAY" != \
     "127.0.0.1:50051 127.0.0.1:50052 127.0.0.1:50053 127.0.0.1:50054" ]; then
  EXPORTS=" SECURELLM_SCHEDULER=$SCHEDULER SECURELLM_REGISTRY=$REGISTRY"
  EXPORTS+=" SECURELLM_BACKEND=$BACKEND SECURELLM_GATEWAY=$GATEWAY"
fi
if [ "$DATA_DIR" != "$HOME/.local/share/securellm" ]; then
  EXPORTS+=" SECURELLM_DATA_DIR=$DATA_DIR"
fi
if [ "$SECURELLM_INTERNAL_TOKEN_FILE" != "$HOME/.local/share/securellm/internal-token" ]; then
  EXPORTS+=" SECURELLM_INTERNAL_TOKEN_FILE=$SECURELLM_INTERNAL_TOKEN_FILE"
fi
CLI_EXPORT=""
if [ -n "$EXPORTS" ]; then
  CLI_EXPORT="  export$EXPORTS"$'\n'
fi
cat <<EOF

SecureLLM is up.
  OpenAI base URL: http://$HTTP/v1
  API key:         $KEY   (also in $DATA_DIR/api-key)
  logs:            $DATA_DIR/logs/

  curl http://$HTTP/v1/chat/completions \\
    -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
    -d '{"model": "$MODEL", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

  python3 -c 'from openai import OpenAI; c = OpenAI(base_url="http://$HTTP/v1", api_key="$KEY"); print(c.chat.completions.create(model="$MODEL", messages=[{"role": "user", "content": "Hello"}], max_tokens=32).choices[0].message.content)'

  ./target/release/securellm status | vram | ps | models | keys list | audit tail
  (the CLI and securellm-mcp find this stack through $STACK_FILE)
${CLI_EXPORT}Ctrl-C stops everything.
EOF
wait
