#!/usr/bin/env bash
# Start the whole SecureLLM stack on loopback: vram-scheduler, registry, backend-manager and
# securellm-gateway as four processes talking gRPC, with one data directory.
#
#   DATA_DIR            data directory (default ~/.local/share/securellm)
#   SECURELLM_MODELS    model roots, colon-separated (default: a generated tiny demo model)
#   BIN                 where the release binaries are (default ./target/release)
#
# Prints the OpenAI base URL, an API key and working curl / Python examples once ready. Ctrl-C
# stops everything (children first, leases released, audit flushed).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"
DATA_DIR="${DATA_DIR:-${SECURELLM_DATA_DIR:-$HOME/.local/share/securellm}}"
mkdir -p "$DATA_DIR/logs"

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
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  # The gateway first (flushes the audit log), then the manager (stops llama-server children and
  # releases leases), then the registry and the scheduler.
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do
    kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    wait "${PIDS[$i]}" 2>/dev/null || true
  done
  echo "stopped"
}
trap cleanup INT TERM EXIT

# start NAME ARGS...: run a service, wait for its `ready` line.
start() {
  local name="$1"; shift
  local out="$DATA_DIR/logs/$name.out"
  : > "$out"
  "$BIN/$name" "$@" > "$out" 2> "$DATA_DIR/logs/$name.log" &
  PIDS+=("$!")
  for _ in $(seq 1 200); do
    if grep -q "^ready $name" "$out"; then
      grep "^ready $name" "$out"
      return 0
    fi
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
      echo "$name failed to start; see $DATA_DIR/logs/$name.log" >&2
      tail -n 20 "$DATA_DIR/logs/$name.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "$name did not become ready; see $DATA_DIR/logs/$name.log" >&2
  exit 1
}

start vram-scheduler --listen 127.0.0.1:50051 --data-dir "$DATA_DIR/scheduler"
grep -h "inventory:" "$DATA_DIR/logs/vram-scheduler.log" | sed 's/^.*inventory:/inventory:/' | head -n 3 || true
start registry --listen 127.0.0.1:50052 --data-dir "$DATA_DIR/registry"
start backend-manager --listen 127.0.0.1:50053 --scheduler 127.0.0.1:50051 --registry 127.0.0.1:50052 \
  --llama-server "$LLAMA_SERVER"
start securellm-gateway --listen 127.0.0.1:50054 --http-listen 127.0.0.1:8088 \
  --backend 127.0.0.1:50053 --registry 127.0.0.1:50052 --data-dir "$DATA_DIR/gateway" \
  --bootstrap-key-file "$DATA_DIR/api-key"

KEY="$(head -n 1 "$DATA_DIR/api-key")"
MODEL="$("$BIN/securellm" models 2>/dev/null | awk 'NR==2 {print $1}')"
MODEL="${MODEL:-tiny}"
cat <<EOF

SecureLLM is up.
  OpenAI base URL: http://127.0.0.1:8088/v1
  API key:         $KEY   (also in $DATA_DIR/api-key)
  logs:            $DATA_DIR/logs/

  curl http://127.0.0.1:8088/v1/chat/completions \\
    -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
    -d '{"model": "$MODEL", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

  python3 -c 'from openai import OpenAI; c = OpenAI(base_url="http://127.0.0.1:8088/v1", api_key="$KEY"); print(c.chat.completions.create(model="$MODEL", messages=[{"role": "user", "content": "Hello"}], max_tokens=32).choices[0].message.content)'

  ./target/release/securellm vram | ps | models | audit tail --data-dir $DATA_DIR/gateway
Ctrl-C stops everything.
EOF
wait
