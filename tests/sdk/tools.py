"""Tool calling through accel with the official OpenAI Python SDK, as an application uses it.

Run by tests/tools.rs against a daemon serving the default model on the Unix socket given as
the first argument: a call forced with tool_choice "required" parses and its arguments fit
the function's schema; streamed, its deltas reassemble to the same call; the follow-up turn
with the tool's result gets a text answer; a named function is the one called.
"""

import json
import sys

import httpx
from openai import OpenAI

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
        },
    },
}


def check_weather_arguments(text):
    args = json.loads(text)
    assert isinstance(args, dict), args
    assert isinstance(args.get("city"), str) and len(args["city"]) <= 40, args
    assert args.get("unit", "celsius") in ("celsius", "fahrenheit"), args
    assert set(args) <= {"city", "unit"}, args
    return args


def main(socket):
    client = OpenAI(
        base_url="http://localhost/v1",
        api_key="unused-on-the-socket",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=socket)),
    )
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    forced = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
        temperature=0, max_tokens=80,
    )
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None, choice.message
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id, call
    assert call.function.name == "get_weather", call
    check_weather_arguments(call.function.arguments)

    # Streamed: the deltas, put together by index as the SDK's users do, are the same call.
    calls = {}
    reasons = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
        temperature=0, max_tokens=80, stream=True,
    ):
        for c in chunk.choices:
            if c.finish_reason:
                reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                if d.function and d.function.name:
                    entry["name"] += d.function.name
                if d.function and d.function.arguments:
                    entry["arguments"] += d.function.arguments
    assert reasons == ["tool_calls"], reasons
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}, calls

    # The follow-up turn, with the tool's result: a text answer.
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    follow = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=40,
    )
    answer = follow.choices[0]
    assert answer.message.tool_calls is None, answer
    assert isinstance(answer.message.content, str) and answer.message.content, answer

    # A named function is the one called, its arguments fitting its own schema.
    named = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=60,
    )
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time", call
    args = json.loads(call.function.arguments)
    assert set(args) == {"zone"} and isinstance(args["zone"], str), args

    print("tool calling through the SDK: ok")


if __name__ == "__main__":
    main(sys.argv[1])
