"""The official OpenAI Python SDK against accel's TCP listener with a token made by
`accelctl tokens create`, as a remote application uses it.

Run by tests/operator.rs: `tcp.py BASE_URL TOKEN MODEL serve` checks a chat answer, a
streamed chat answer equal to it, a completion, and that an unknown model raises the SDK's
NotFoundError and an oversized max_tokens its BadRequestError; `... revoked` checks that the
same token now raises AuthenticationError (401).
"""

import sys

import openai
from openai import OpenAI

base_url, token, model, mode = sys.argv[1:5]
client = OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60)

if mode == "revoked":
    try:
        client.models.list()
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
        print("revoked token refused with 401")
        sys.exit(0)
    raise SystemExit("a revoked token was accepted")

models = [m.id for m in client.models.list().data]
assert model in models, models

messages = [{"role": "user", "content": "Say something."}]
whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0
)
text = whole.choices[0].message.content
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.completion_tokens > 0, whole

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True
)
streamed = "".join(
    chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
)
assert streamed == text, (streamed, text)

completion = client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0
)
assert completion.choices[0].text, completion
assert completion.usage.completion_tokens == 8 or completion.choices[0].finish_reason == "stop"

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("an unknown model was served")
except openai.NotFoundError as e:
    assert e.status_code == 404, e

try:
    client.completions.create(model=model, prompt="x", max_tokens=10**6)
    raise SystemExit("max_tokens beyond the context was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400, e

print("chat, streamed chat, completion and errors as the SDK expects")
