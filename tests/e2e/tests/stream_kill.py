"""Stream a long chat completion with the official `openai` client; after the first chunk print
FIRST (the test then kills the model's llama-server), keep reading, and report how the stream
ended: `ERROR <exception class>: <message>` or `END <chunks>`.

Environment: BASE_URL, API_KEY, MODEL, RID (x-request-id).
"""
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0, timeout=60)
n = 0
try:
    stream = client.chat.completions.create(
        model=os.environ["MODEL"],
        messages=[{"role": "user", "content": "tell me a long story"}],
        max_tokens=4000,  # within the gateway's default max_tokens_cap (4096)
        stream=True,
        extra_headers={"x-request-id": os.environ["RID"]},
    )
    for chunk in stream:
        n += 1
        if n == 1:
            print("FIRST", flush=True)
    print(f"END {n}", flush=True)
except Exception as e:  # noqa: BLE001 - report whatever the client raised
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
sys.exit(0)
