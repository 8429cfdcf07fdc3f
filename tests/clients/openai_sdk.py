"""The official openai SDK against `introspect serve`: chat (plain, n > 1 with a seed, logprobs, streaming)
and its typed errors. Prints one JSON object of what it saw; the Rust test asserts on it.

usage: python openai_sdk.py BASE_URL MODEL
"""
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Name a colour."}]
out = {"sdk": openai.__version__}

plain = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
out["plain"] = plain.choices[0].message.content
out["finish_reason"] = plain.choices[0].finish_reason
out["usage"] = plain.usage.total_tokens

seeded = lambda: client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=1.0, n=4, seed=7
)
a, b = seeded(), seeded()
out["n"] = len(a.choices)
out["seeded_repeat"] = [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
out["seeded_texts"] = [c.message.content for c in a.choices]

lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5
)
content = lp.choices[0].logprobs.content
out["logprob_tokens"] = [t.token for t in content]
out["logprobs_ok"] = all(
    len(t.top_logprobs) == 5 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content
)
out["logprob_text"] = "".join(t.token for t in content) == lp.choices[0].message.content

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.total_tokens
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
out["stream"] = "".join(pieces)
out["stream_usage"] = usage

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
except openai.NotFoundError as e:
    out["not_found"] = e.status_code
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=2, n=1000)
except openai.BadRequestError as e:
    out["bad_request"] = [e.status_code, e.param if hasattr(e, "param") else None, str(e)]

out["models"] = [m.id for m in client.models.list().data]
print(json.dumps(out))
