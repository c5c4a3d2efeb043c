"""The official `openai` Python client against the SecureLLM gateway, unchanged.

Environment: BASE_URL, API_KEY (all models), SCOPED_KEY (only `tiny`), LIMITED_KEY (2 requests
per minute). Exits non-zero with a message on the first failed check; prints OK at the end.
"""
import os
import sys

import openai
from openai import OpenAI

base = os.environ["BASE_URL"]
client = OpenAI(base_url=base, api_key=os.environ["API_KEY"], max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


# Models list.
ids = [m.id for m in client.models.list().data]
check("tiny" in ids and "other" in ids, f"models.list: {ids}")

# Chat, non-streaming (the model is not loaded yet: it loads on demand).
r = client.chat.completions.create(
    model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
)
check(r.object == "chat.completion", f"chat object {r.object}")
check(isinstance(r.choices[0].message.content, str), "chat content")
check(r.usage.completion_tokens == 8, f"usage {r.usage}")
check(r.model == "tiny", f"model {r.model}")

# Chat, streaming.
chunks = list(
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True
    )
)
check(len(chunks) >= 5, f"stream chunks {len(chunks)}")
check(all(c.object == "chat.completion.chunk" for c in chunks), "chunk objects")
check(all(c.usage is None for c in chunks), "no usage chunk unless asked")
with_usage = list(
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
)
check(with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 6, "include_usage")

# Completions.
c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5)
check(c.object == "text_completion" and isinstance(c.choices[0].text, str), f"completion {c}")

# Embeddings.
e = client.embeddings.create(model="tiny", input="hello world")
check(len(e.data) == 1 and len(e.data[0].embedding) == 64, "embedding of n_embd floats")

# Errors, in the client's own classes.
try:
    OpenAI(base_url=base, api_key="sk-slm-not-a-key", max_retries=0).models.list()
    check(False, "bad key accepted")
except openai.AuthenticationError as ex:
    check(ex.status_code == 401, "401")

scoped = OpenAI(base_url=base, api_key=os.environ["SCOPED_KEY"], max_retries=0)
try:
    scoped.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    check(False, "out-of-scope model accepted")
except openai.NotFoundError as ex:
    check(ex.status_code == 404, "404")
check([m.id for m in scoped.models.list().data] == ["tiny"], "scoped models list")

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check(False, "unknown model accepted")
except openai.NotFoundError:
    pass

try:
    client.chat.completions.create(model="tiny", messages="not a list", max_tokens=1)
    check(False, "malformed request accepted")
except openai.BadRequestError as ex:
    check(ex.status_code == 400, "400")

limited = OpenAI(base_url=base, api_key=os.environ["LIMITED_KEY"], max_retries=0)
limited.models.list()
limited.models.list()
try:
    limited.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    limited.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    limited.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    check(False, "rate limit not enforced")
except openai.RateLimitError as ex:
    check(ex.status_code == 429, "429")
    check(int(ex.response.headers.get("retry-after", "0")) >= 1, "retry-after")

print("OK")
