"""The official `openai` Python client against the whole SecureLLM stack (four processes).

Environment: BASE_URL, API_KEY (all models), MODEL (a local model not loaded yet), OTHER (another
local model), RID (prefix of the x-request-id of every request, so the audit rows can be found:
RID-models, RID-chat, RID-stream, RID-embeddings). Exits non-zero with a message on the first
failed check; prints OK at the end.
"""
import os
import sys

from openai import OpenAI

base = os.environ["BASE_URL"]
model = os.environ["MODEL"]
other = os.environ["OTHER"]
rid = os.environ["RID"]
client = OpenAI(base_url=base, api_key=os.environ["API_KEY"], max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def hdr(step):
    return {"x-request-id": f"{rid}-{step}"}


# The registry's models, through the gateway.
models = client.models.list(extra_headers=hdr("models")).data
ids = sorted(m.id for m in models)
check(ids == sorted([model, other]), f"models.list: {ids}")
check(all(m.owned_by == "securellm" and m.object == "model" for m in models), f"{models}")

# Chat, non-streaming: the model is not loaded yet, it loads on demand.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello"}],
    max_tokens=8,
    temperature=0,
    extra_headers=hdr("chat"),
)
check(r.object == "chat.completion", f"chat object {r.object}")
check(r.model == model, f"chat model {r.model}")
check(isinstance(r.choices[0].message.content, str), f"chat content {r.choices[0]}")
check(r.choices[0].message.role == "assistant", "assistant role")
check(1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens >= 1, f"usage {r.usage}")

# Chat, streaming, with the usage chunk asked for.
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=hdr("stream"),
    )
)
check(len(chunks) >= 3, f"stream chunks {len(chunks)}")
check(all(c.object == "chat.completion.chunk" for c in chunks), "chunk objects")
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(len(text) > 0, "streamed text")
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check(finish in (["length"], ["stop"]), f"one finish_reason: {finish}")
usage = chunks[-1].usage
check(usage is not None and 1 <= usage.completion_tokens <= 12, f"usage chunk {chunks[-1]}")

# Embeddings (a separate `--embeddings` instance of the same model).
e = client.embeddings.create(model=model, input=["hello world", "bye"], extra_headers=hdr("embeddings"))
check(len(e.data) == 2, f"two embeddings: {len(e.data)}")
check(all(len(d.embedding) == 64 for d in e.data), "n_embd floats each")
check(e.data[0].embedding != e.data[1].embedding, "different inputs, different vectors")

print("OK")
