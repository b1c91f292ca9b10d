#!/usr/bin/env python3
"""Structured outputs through the official `openai` client, checked with the `jsonschema` package.

    python tests/structured_client.py BASE_URL MODEL ADAPTER

Against a head serving MODEL (and ADAPTER, an adapter directory name under its adapters root):
- three JSON schemas (nested objects, arrays with minItems, enums, additionalProperties: false),
  20 completions each at temperature 1.0, sent concurrently: every answer parses and validates;
- the same schema with the adapter, in a batch where half the requests are free text;
- `guided_regex` and `guided_choice` (vLLM's fields, through `extra_body`) always match;
- streaming under a schema: the joined deltas parse and validate;
- `n: 3` answers three choices, each valid;
- tool calls: `tool_choice: "required"` and a named function always return a call whose arguments
  validate against the function's parameters (`finish_reason: "tool_calls"`); with `auto`, a call
  in the output streams as `delta.tool_calls`; a round trip (call, tool message, answer).
Prints "structured client: ok" and exits 0 when every check passes.
"""

import json
import os
import re
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI
import jsonschema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "country": {"enum": ["FR", "DE", "IT", "ES"]},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}

SHOPPING = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "item": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["item", "quantity"],
                "additionalProperties": False,
            },
            "minItems": 2,
            "maxItems": 4,
        },
        "urgent": {"type": "boolean"},
    },
    "required": ["items", "urgent"],
    "additionalProperties": False,
}

VERDICT = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["approve", "reject", "escalate"]},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 5},
                   "minItems": 3, "maxItems": 3},
        "reason": {"type": ["string", "null"], "maxLength": 24},
    },
    "required": ["verdict", "scores", "reason"],
    "additionalProperties": False,
}

SCHEMAS = [("person", PERSON), ("shopping", SHOPPING), ("verdict", VERDICT)]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def response_format(name, schema):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask_json(client, model, name, schema, seed):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Reply with a {name} as JSON."}],
        max_tokens=200,
        temperature=1.0,
        seed=seed,
        response_format=response_format(name, schema),
    )
    choice = r.choices[0]
    check(choice.finish_reason == "stop", f"{name} seed {seed}: finish_reason {choice.finish_reason!r}: {choice.message.content!r}")
    value = json.loads(choice.message.content)
    jsonschema.validate(value, schema)
    return value


def check_schemas(client, model):
    with ThreadPoolExecutor(max_workers=10) as pool:
        for name, schema in SCHEMAS:
            values = list(pool.map(lambda s: ask_json(client, model, name, schema, s), range(20)))
            distinct = {json.dumps(v, sort_keys=True) for v in values}
            # Sampled at temperature 1.0: the answers differ (the schema is not a fixed string).
            check(len(distinct) > 1, f"{name}: 20 sampled answers are all {values[0]}")


def check_adapter_and_free_rows(client, model, adapter):
    def free(seed):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me about the sea."}],
            max_tokens=24,
            temperature=1.0,
            seed=seed,
        )
        check(r.choices[0].finish_reason in ("stop", "length"), "free row")
        return r.choices[0].message.content

    with ThreadPoolExecutor(max_workers=10) as pool:
        constrained = [pool.submit(ask_json, client, adapter, "person", PERSON, s) for s in range(5)]
        frees = [pool.submit(free, 100 + s) for s in range(5)]
        for f in constrained + frees:
            f.result()


def check_regex_and_choice(client, model):
    pattern = r"[A-Z]{2}-[0-9]{3}"
    choices = ["alpha", "beta gamma", "delta.epsilon"]

    def regex(seed):
        r = client.completions.create(
            model=model, prompt="A code:", max_tokens=12, temperature=1.0, seed=seed,
            extra_body={"guided_regex": pattern},
        )
        text = r.choices[0].text
        check(re.fullmatch(pattern, text) is not None, f"regex output {text!r}")

    def choice(seed):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Pick one."}], max_tokens=12,
            temperature=1.0, seed=seed, extra_body={"structured_outputs": {"choice": choices}},
        )
        text = r.choices[0].message.content
        check(text in choices, f"choice output {text!r}")

    with ThreadPoolExecutor(max_workers=10) as pool:
        for f in [pool.submit(regex, s) for s in range(10)] + [pool.submit(choice, s) for s in range(10)]:
            f.result()


def check_stream(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A verdict as JSON."}],
        max_tokens=200,
        temperature=1.0,
        seed=3,
        stream=True,
        response_format=response_format("verdict", VERDICT),
    )
    pieces, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check(finish == "stop", f"stream finish_reason {finish!r}")
    jsonschema.validate(json.loads("".join(pieces)), VERDICT)


def check_n(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "A person as JSON."}],
        max_tokens=200,
        temperature=1.0,
        seed=11,
        n=3,
        response_format=response_format("person", PERSON),
    )
    check(len(r.choices) == 3, f"{len(r.choices)} choices for n=3")
    check([c.index for c in r.choices] == [0, 1, 2], "choice indices")
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
    check(r.usage.completion_tokens >= 3, "usage counts every choice")


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather of a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Adds two integers.",
        "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
            "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(choice, names):
    check(choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason!r}")
    calls = choice.message.tool_calls
    check(calls and len(calls) >= 1, f"no tool_calls in {choice.message}")
    for call in calls:
        check(call.type == "function" and call.id.startswith("call_"), f"call {call}")
        check(call.function.name in names, f"called {call.function.name!r}, allowed {names}")
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    return calls[0]


def check_tools(client, model):
    def required(seed):
        r = client.chat.completions.create(model=model, messages=WEATHER, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=1.0, seed=seed)
        check_call(r.choices[0], ["get_weather", "add"])

    def named(seed):
        r = client.chat.completions.create(
            model=model, messages=WEATHER, tools=TOOLS, max_tokens=120, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "add"}})
        check_call(r.choices[0], ["add"])

    with ThreadPoolExecutor(max_workers=10) as pool:
        for f in [pool.submit(required, s) for s in range(5)] + [pool.submit(named, s) for s in range(5)]:
            f.result()

    # auto: the model's output is a call (a grammar makes it one here), streamed as tool_calls.
    forced = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    stream = client.chat.completions.create(
        model=model, messages=WEATHER, tools=TOOLS, tool_choice="auto", max_tokens=120, temperature=0,
        stream=True, extra_body={"structured_outputs": {"choice": [forced]}})
    deltas, finish, content = [], None, []
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.tool_calls:
                deltas.extend(c.delta.tool_calls)
            if c.delta.content:
                content.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check(finish == "tool_calls", f"auto stream finish_reason {finish!r}")
    check(len(deltas) == 1 and deltas[0].index == 0, f"tool_call deltas {deltas}")
    check(deltas[0].function.name == "get_weather", f"{deltas[0]}")
    check(json.loads(deltas[0].function.arguments) == {"city": "Paris", "unit": "celsius"}, f"{deltas[0]}")
    check("".join(content) == "", f"content beside the call: {content}")

    # A full round trip: the call, the tool's answer, the model's final answer.
    r = client.chat.completions.create(model=model, messages=WEATHER, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=0)
    call = check_call(r.choices[0], ["get_weather", "add"])
    messages = WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=24,
                                       temperature=0)
    choice = r.choices[0]
    check(choice.finish_reason in ("stop", "length", "tool_calls"), f"round trip {choice.finish_reason!r}")
    check(choice.message.content or choice.message.tool_calls, "round trip: empty answer")
    check(r.usage.prompt_tokens > 60, f"the tool turns reached the prompt ({r.usage.prompt_tokens} tokens)")


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    base_url, model, adapter = argv[1].rstrip("/"), argv[2], argv[3]
    client = OpenAI(base_url=base_url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "unused"),
                    max_retries=0, timeout=300)
    steps = [
        ("json schemas", lambda: check_schemas(client, model)),
        ("adapter with free rows", lambda: check_adapter_and_free_rows(client, model, adapter)),
        ("regex and choice", lambda: check_regex_and_choice(client, model)),
        ("stream", lambda: check_stream(client, model)),
        ("n", lambda: check_n(client, model)),
        ("tools", lambda: check_tools(client, model)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            print(f"structured client: FAILED at {name}: {e}", file=sys.stderr)
            return 1
        print(f"structured client: {name} ok", flush=True)
    print("structured client: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
