#!/usr/bin/env python3
"""A fake vLLM / Text Generation Inference server for tests (Python 3.11 standard library only).

It accepts the real command lines and serves the real OpenAI-compatible HTTP API of both engines,
as far as the backend manager uses them:

  vLLM (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html):
      fake_openai_engine.py serve MODEL_DIR --host H --port P --served-model-name NAME
          --max-model-len N --max-num-seqs N --gpu-memory-utilization F
      Requests whose `model` is not the served name get vLLM's 404
      {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", ...}.
  TGI (text-generation-launcher, https://huggingface.co/docs/text-generation-inference):
      fake_openai_engine.py --model-id MODEL_DIR --hostname H --port P --max-total-tokens N
          --max-concurrent-requests N --cuda-memory-fraction F [--shard-uds-path PATH]
          [--master-port N]
      `model` in requests is ignored, as TGI does; responses carry the model id.

Unknown flags are refused (exit status 2, like both real CLIs); a memory fraction outside (0, 1] is
refused (exit status 1).

API key: as the real engines read `--api-key` from the environment (`VLLM_API_KEY` for vLLM,
`API_KEY` for the TGI launcher), so does the fake; when it is set, every request but `GET /health`
needs `Authorization: Bearer <key>`, else 401.

Endpoints: GET /health (503 while "loading", then 200), GET /v1/models, POST /v1/chat/completions
and POST /v1/completions (non-streaming, or `stream: true` as server-sent events ending with
`data: [DONE]`; with `stream_options.include_usage` every chunk has `"usage": null` and a last
chunk with `choices: []` carries the usage, as vLLM does). Generated text is `tok0 tok1 ...`:
`max_tokens` tokens (default 8).

Test hooks (environment):
  FAKE_ENGINE_ARGS=FILE    write the argv received (JSON list, program excluded) to FILE.
  FAKE_ENGINE_ENV=FILE     write {"CUDA_VISIBLE_DEVICES": value or null, "api_key_set": bool} to FILE.
  FAKE_ENGINE_LOAD_MS=N    answer /health 503 for N ms after start (default 200).
  FAKE_ENGINE_FAIL=MSG     print MSG to stderr and exit 1 at once (a failed start).
  FAKE_ENGINE_TOKEN_MS=N   wait N ms before each streamed token (default 0).

It prints one line, `fake <vllm|tgi> listening on http://H:P`, once it accepts connections.
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = None  # "vllm" | "tgi"
OPTS = None
READY_AT = 0.0
API_KEY = None


def vllm_parser():
    p = argparse.ArgumentParser(prog="vllm serve")
    p.add_argument("model")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    return p


def tgi_parser():
    p = argparse.ArgumentParser(prog="text-generation-launcher")
    p.add_argument("--model-id", required=True)
    p.add_argument("--hostname", default="0.0.0.0")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--max-concurrent-requests", type=int, default=128)
    p.add_argument("--cuda-memory-fraction", type=float, default=1.0)
    p.add_argument("--shard-uds-path", default="/tmp/text-generation-server")
    p.add_argument("--master-port", type=int, default=29500)
    return p


def served_name():
    if MODE == "vllm":
        return OPTS.served_model_name[0] if OPTS.served_model_name else OPTS.model
    return OPTS.model_id


def max_len():
    return OPTS.max_model_len if MODE == "vllm" else OPTS.max_total_tokens


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-" + "engine"

    def log_message(self, *a):
        pass

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message, typ):
        if MODE == "vllm":
            self.send_json(status, {"object": "error", "message": message, "type": typ, "param": None, "code": status})
        else:
            self.send_json(status, {"error": message, "error_type": typ})

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def authorized(self):
        if not API_KEY or self.headers.get("authorization") == f"Bearer {API_KEY}":
            return True
        self.send_json(401, {"error": "Unauthorized"})
        return False

    def do_GET(self):
        if self.path != "/health" and not self.authorized():
            return
        if self.path == "/health":
            if time.monotonic() < READY_AT:
                self.send_json(503, {"error": "loading"})
            else:
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
        elif self.path == "/v1/models":
            self.send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": served_name(),
                            "object": "model",
                            "created": int(time.time()),
                            "owned_by": MODE,
                            "root": OPTS.model if MODE == "vllm" else OPTS.model_id,
                            "max_model_len": max_len(),
                        }
                    ],
                },
            )
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        if not self.authorized():
            self.rfile.read(n)
            return
        try:
            b = json.loads(self.rfile.read(n) or b"{}")
        except json.JSONDecodeError as e:
            self.error(400, f"invalid JSON: {e}", "BadRequestError")
            return
        if not isinstance(b, dict):
            self.error(400, "body must be a JSON object", "BadRequestError")
            return
        if self.path == "/v1/chat/completions":
            self.complete(b, chat=True)
        elif self.path == "/v1/completions":
            self.complete(b, chat=False)
        else:
            self.send_json(404, {"detail": "Not Found"})

    def complete(self, b, chat):
        if time.monotonic() < READY_AT:
            self.error(503, "the model is loading", "ServiceUnavailableError")
            return
        if MODE == "vllm" and b.get("model") != served_name():
            self.error(404, f"The model `{b.get('model')}` does not exist.", "NotFoundError")
            return
        if chat and not isinstance(b.get("messages"), list):
            self.error(400, "`messages` must be a list", "BadRequestError")
            return
        if not chat and not isinstance(b.get("prompt"), (str, list)):
            self.error(400, "`prompt` is required", "BadRequestError")
            return
        n = b.get("max_tokens")
        n = 8 if n is None else int(n)
        toks = [f"tok{i} " for i in range(n)]
        if chat:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in b["messages"])
        else:
            prompt_tokens = len(str(b["prompt"]).split())
        if max_len() and prompt_tokens + n > max_len():
            self.error(
                400,
                f"This model's maximum context length is {max_len()} tokens. However, you requested "
                f"{prompt_tokens + n} tokens.",
                "BadRequestError",
            )
            return
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(8).hex()
        created = int(time.time())
        model = served_name()
        if not b.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": "".join(toks)}, "logprobs": None, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": "".join(toks), "logprobs": None, "finish_reason": "length"}
            )
            self.send_json(
                200,
                {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model, "choices": [choice], "usage": usage},
            )
            return
        include_usage = bool((b.get("stream_options") or {}).get("include_usage"))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, usage_value=None, last=False):
            d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                d["usage"] = usage_value if last else None
            self.chunk(b"data: " + json.dumps(d).encode() + b"\n\n")

        delay = int(os.environ.get("FAKE_ENGINE_TOKEN_MS", "0")) / 1000
        for i, t in enumerate(toks):
            if delay:
                time.sleep(delay)
            finish = "length" if i == len(toks) - 1 else None
            if chat:
                delta = {"role": "assistant", "content": t} if i == 0 else {"content": t}
                event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
            else:
                event([{"index": 0, "text": t, "logprobs": None, "finish_reason": finish}])
        if include_usage:
            event([], usage, last=True)
        self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")


def main():
    global MODE, OPTS, READY_AT, API_KEY
    argv = sys.argv[1:]
    MODE = "vllm" if argv[:1] == ["serve"] else "tgi"
    API_KEY = os.environ.get("VLLM_API_KEY" if MODE == "vllm" else "API_KEY") or None
    if os.environ.get("FAKE_ENGINE_ARGS"):
        with open(os.environ["FAKE_ENGINE_ARGS"], "w") as f:
            json.dump(argv, f)
    if os.environ.get("FAKE_ENGINE_ENV"):
        with open(os.environ["FAKE_ENGINE_ENV"], "w") as f:
            json.dump({"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "api_key_set": API_KEY is not None}, f)
    if os.environ.get("FAKE_ENGINE_FAIL"):
        print(os.environ["FAKE_ENGINE_FAIL"], file=sys.stderr, flush=True)
        return 1
    if argv[:1] == ["serve"]:
        MODE, OPTS = "vllm", vllm_parser().parse_args(argv[1:])
        fraction, host = OPTS.gpu_memory_utilization, OPTS.host
    else:
        MODE, OPTS = "tgi", tgi_parser().parse_args(argv)
        fraction, host = OPTS.cuda_memory_fraction, OPTS.hostname
    if not 0 < fraction <= 1:
        print(f"error: memory fraction {fraction} is not in (0, 1]", file=sys.stderr, flush=True)
        return 1
    print(f"loading {served_name()} (memory fraction {fraction})", file=sys.stderr, flush=True)
    READY_AT = time.monotonic() + int(os.environ.get("FAKE_ENGINE_LOAD_MS", "200")) / 1000
    srv = ThreadingHTTPServer((host, OPTS.port), Handler)
    srv.daemon_threads = True
    print(f"fake {MODE} listening on http://{host}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
