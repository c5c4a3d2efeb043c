#!/usr/bin/env python3
"""A fake Ollama daemon for tests (Python 3.11 standard library only).

It mimics the parts of Ollama's real HTTP API (https://github.com/ollama/ollama/blob/main/docs/api.md
and docs/openai.md) that the backend manager uses, with the same paths, JSON shapes and status
codes:

  POST /api/generate          load a model (empty or absent `prompt`), unload it (`keep_alive: 0`),
                              or generate (a non-empty `prompt`); NDJSON when `stream` is not false.
                              404 {"error": "model \"x\" not found, try pulling it first"} for a model
                              it does not have.
  GET  /api/ps                {"models": [{"name", "model", "size", "digest", "details",
                              "expires_at", "size_vram", "context_length"}]} for the loaded models.
  GET  /api/tags              {"models": [{"name", "model", "modified_at", "size", "digest",
                              "details"}]} for the models it has.
  GET  /api/version           {"version": "0.0.0-fake"}.
  POST /v1/chat/completions   OpenAI-compatible chat, non-streaming, or `stream: true` as
  POST /v1/completions        server-sent events ending with `data: [DONE]`, with a usage-only
                              chunk (`choices: []`) last when `stream_options.include_usage` is
                              true. Loads the model on demand like Ollama does.
  POST /v1/embeddings         OpenAI-compatible embeddings (a fixed small vector per input).

Test-only additions (not in Ollama): GET /fake/log lists the /api/generate bodies received.

Generated text is `tok0 tok1 ...`: `max_tokens` tokens (default 8), finish_reason "length" when it
stopped because of `max_tokens`.

Usage: fake_ollama.py --port P [--model NAME:TAG ...] [--size-vram BYTES] [--size BYTES]
  --port 0 picks a free port. It prints one line, `fake ollama listening on http://127.0.0.1:P`,
  once it accepts connections. Without --model it has every model asked for.
"""

import argparse
import hashlib
import json
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
LOADED = {}  # name -> {"expires_at": str}
LOG = []
ARGS = None


def norm(name):
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else name + ":latest"


def known(name):
    return not ARGS.model or norm(name) in {norm(m) for m in ARGS.model}


def now_iso():
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def expires(keep_alive):
    """Ollama's keep_alive: a number of seconds or a duration string; negative = forever."""
    if keep_alive is None:
        seconds = 300
    elif isinstance(keep_alive, (int, float)):
        seconds = keep_alive
    else:
        s = str(keep_alive).strip()
        mult = {"s": 1, "m": 60, "h": 3600}.get(s[-1:], None)
        seconds = float(s[:-1]) * mult if mult else float(s)
    if seconds < 0:
        return "2318-11-26T00:00:00Z"
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


def details():
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "1M",
        "quantization_level": "F32",
    }


def digest(name):
    return hashlib.sha256(norm(name).encode()).hexdigest()


def tokens(n):
    return [f"tok{i} " for i in range(n)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-ollama"

    def log_message(self, *a):
        pass

    # ---- plumbing -------------------------------------------------------------------------------

    def body(self):
        n = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            v = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            self.send_json(400, {"error": f"invalid JSON: {e}"})
            return None
        if not isinstance(v, dict):
            self.send_json(400, {"error": "body must be a JSON object"})
            return None
        return v

    def send_json(self, status, obj, ctype="application/json; charset=utf-8"):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self, ctype):
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def not_found_model(self, name, openai=False):
        msg = f'model "{name}" not found, try pulling it first'
        if openai:
            self.send_json(404, {"error": {"message": msg, "type": "api_error", "param": None, "code": None}})
        else:
            self.send_json(404, {"error": msg})

    def load(self, name, keep_alive):
        with LOCK:
            LOADED[norm(name)] = {"expires_at": expires(keep_alive)}

    # ---- routes ---------------------------------------------------------------------------------

    def do_GET(self):
        if self.path == "/api/ps":
            with LOCK:
                models = [
                    {
                        "name": n,
                        "model": n,
                        "size": ARGS.size,
                        "digest": digest(n),
                        "details": details(),
                        "expires_at": m["expires_at"],
                        "size_vram": ARGS.size_vram,
                        "context_length": 4096,
                    }
                    for n, m in LOADED.items()
                ]
            self.send_json(200, {"models": models})
        elif self.path == "/api/tags":
            with LOCK:
                names = [norm(m) for m in ARGS.model] or sorted(LOADED)
            self.send_json(
                200,
                {
                    "models": [
                        {
                            "name": n,
                            "model": n,
                            "modified_at": now_iso(),
                            "size": ARGS.size,
                            "digest": digest(n),
                            "details": details(),
                        }
                        for n in names
                    ]
                },
            )
        elif self.path == "/api/version":
            self.send_json(200, {"version": "0.0.0-fake"})
        elif self.path == "/fake/log":
            with LOCK:
                self.send_json(200, list(LOG))
        elif self.path in ("/", "/api"):
            data = b"Ollama is running"
            self.send_response(200)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_json(404, {"error": "404 page not found"})

    def do_POST(self):
        b = self.body()
        if b is None:
            return
        if self.path == "/api/generate":
            self.generate(b)
        elif self.path == "/v1/chat/completions":
            self.openai(b, chat=True)
        elif self.path == "/v1/completions":
            self.openai(b, chat=False)
        elif self.path == "/v1/embeddings":
            self.embeddings(b)
        else:
            self.send_json(404, {"error": "404 page not found"})

    def generate(self, b):
        with LOCK:
            LOG.append(b)
        name = b.get("model")
        if not isinstance(name, str) or not name:
            self.send_json(400, {"error": "model is required"})
            return
        if not known(name):
            self.not_found_model(name)
            return
        keep_alive = b.get("keep_alive")
        prompt = b.get("prompt") or ""
        base = {"model": name, "created_at": now_iso(), "response": ""}
        if keep_alive is not None and keep_alive in (0, "0", "0s", "0m") and not prompt:
            with LOCK:
                LOADED.pop(norm(name), None)
            self.send_json(200, {**base, "done": True, "done_reason": "unload"})
            return
        self.load(name, keep_alive)
        if not prompt:
            self.send_json(200, {**base, "done": True, "done_reason": "load"})
            return
        n = int((b.get("options") or {}).get("num_predict") or 8)
        toks = tokens(n)
        final = {
            **base,
            "done": True,
            "done_reason": "length",
            "prompt_eval_count": len(prompt.split()),
            "eval_count": n,
        }
        if b.get("stream") is False:
            self.send_json(200, {**final, "response": "".join(toks)})
            return
        self.start_chunked("application/x-ndjson")
        for t in toks:
            self.chunk((json.dumps({**base, "response": t, "done": False}) + "\n").encode())
        self.chunk((json.dumps(final) + "\n").encode())
        self.end_chunked()

    def openai(self, b, chat):
        name = b.get("model")
        if not isinstance(name, str) or not name:
            self.send_json(400, {"error": {"message": "model is required", "type": "invalid_request_error", "param": None, "code": None}})
            return
        if not known(name):
            self.not_found_model(name, openai=True)
            return
        if chat and not isinstance(b.get("messages"), list):
            self.send_json(400, {"error": {"message": "invalid message format", "type": "invalid_request_error", "param": None, "code": None}})
            return
        with LOCK:
            loaded = norm(name) in LOADED
        if not loaded:
            self.load(name, None)
        n = b.get("max_tokens")
        n = 8 if n is None else int(n)
        toks = tokens(n)
        if chat:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in b["messages"])
        else:
            prompt_tokens = len(str(b.get("prompt", "")).split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        rid = ("chatcmpl-" if chat else "cmpl-") + str(int(time.time() * 1000) % 1000)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        finish = "length"
        if not b.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": "".join(toks)}, "finish_reason": finish}
                if chat
                else {"text": "".join(toks), "index": 0, "finish_reason": finish}
            )
            self.send_json(
                200,
                {"id": rid, "object": obj, "created": created, "model": name, "system_fingerprint": "fp_ollama", "choices": [choice], "usage": usage},
            )
            return
        self.start_chunked("text/event-stream")
        cobj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, extra=None):
            d = {"id": rid, "object": cobj, "created": created, "model": name, "system_fingerprint": "fp_ollama", "choices": choices}
            if extra:
                d.update(extra)
            self.chunk(b"data: " + json.dumps(d).encode() + b"\n\n")

        for i, t in enumerate(toks):
            if chat:
                delta = {"role": "assistant", "content": t}
                event([{"index": 0, "delta": delta, "finish_reason": None}])
            else:
                event([{"text": t, "index": 0, "finish_reason": None}])
        if chat:
            event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": finish}])
        else:
            event([{"text": "", "index": 0, "finish_reason": finish}])
        if (b.get("stream_options") or {}).get("include_usage"):
            event([], {"usage": usage})
        self.chunk(b"data: [DONE]\n\n")
        self.end_chunked()

    def embeddings(self, b):
        name = b.get("model")
        if not isinstance(name, str) or not known(name):
            self.not_found_model(str(name), openai=True)
            return
        inputs = b.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        self.send_json(
            200,
            {
                "object": "list",
                "data": [{"object": "embedding", "embedding": [0.1, 0.2, 0.3], "index": i} for i in range(len(inputs))],
                "model": name,
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            },
        )


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", action="append", default=[], help="a model it has (repeatable); none = any")
    p.add_argument("--size-vram", type=int, default=192 * 1024 * 1024)
    p.add_argument("--size", type=int, default=None, help="default: size-vram")
    ARGS = p.parse_args()
    if ARGS.size is None:
        ARGS.size = ARGS.size_vram
    srv = ThreadingHTTPServer((ARGS.host, ARGS.port), Handler)
    srv.daemon_threads = True
    print(f"fake ollama listening on http://{ARGS.host}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
