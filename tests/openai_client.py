#!/usr/bin/env python3
"""Checks Tessera's OpenAI-compatible routes with the official `openai` client, unchanged.

    python tests/openai_client.py BASE_URL MODEL [ADAPTER_NAME]

BASE_URL is the server's root (e.g. http://127.0.0.1:8080), MODEL the base model's name as
`GET /v1/models` lists it, ADAPTER_NAME an adapter (directory name under the adapters root, or a
fine-tune job id) to chat with. Set OPENAI_API_KEY to the server's bearer token if it has one.
Prints "openai client: ok" and exits 0 when every check passes; exits 1 otherwise.
"""

import os
import sys
import traceback

try:
    import openai
    from openai import OpenAI
except ImportError:  # pragma: no cover
    print("openai client: the `openai` package is not installed (pip install openai)", file=sys.stderr)
    sys.exit(2)

MESSAGES = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def check_models(client, model, adapter):
    ids = [m.id for m in client.models.list().data]
    check(model in ids, f"{model!r} not among /v1/models ids {ids}")
    if adapter is not None and not adapter.startswith("ft-"):
        # A directory under the adapters root is listed by its name (or by its full path when a
        # replica holds it).
        check(
            any(i == adapter or i.endswith("/" + adapter) for i in ids),
            f"adapter {adapter!r} not among /v1/models ids {ids}",
        )


def check_chat(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    check(r.object == "chat.completion", f"object {r.object!r}")
    check(r.id.startswith("chatcmpl-"), f"id {r.id!r}")
    check(r.model == model, f"model echoed as {r.model!r}")
    check(len(r.choices) == 1, "one choice")
    choice = r.choices[0]
    content = choice.message.content
    check(choice.message.role == "assistant", f"role {choice.message.role!r}")
    check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
    check(content or choice.finish_reason == "stop", "empty content without a stop")
    check(r.usage is not None, "usage missing")
    check(r.usage.prompt_tokens > 0, f"prompt_tokens {r.usage.prompt_tokens}")
    check(0 < r.usage.completion_tokens <= 8, f"completion_tokens {r.usage.completion_tokens}")
    check(
        r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
        "total_tokens is not the sum",
    )
    lp = choice.logprobs
    check(lp is not None and lp.content is not None, "logprobs missing")
    check(len(lp.content) == r.usage.completion_tokens, f"{len(lp.content)} logprobs for {r.usage.completion_tokens} tokens")
    for item in lp.content:
        check(isinstance(item.token, str), "token is a string")
        check(item.logprob <= 0.0, f"logprob {item.logprob} > 0")
        check(item.bytes == list(item.token.encode("utf-8")), f"bytes of {item.token!r}")
        check(len(item.top_logprobs) == 2, f"{len(item.top_logprobs)} top_logprobs, asked 2")
        check(item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob, "top_logprobs not sorted")
        # Greedy: the chosen token is the most likely one.
        check(abs(item.top_logprobs[0].logprob - item.logprob) < 1e-3, "greedy token is not the top one")
    return content, choice.finish_reason


def check_chat_stream(client, model, expected, expected_finish):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason is not None:
                finish = c.finish_reason
    text = "".join(pieces)
    check(roles == ["assistant"], f"roles {roles}")
    check(text == expected, f"streamed {text!r} != non-streamed {expected!r}")
    check(finish == expected_finish, f"stream finish_reason {finish!r} != {expected_finish!r}")
    check(usage is not None and usage.completion_tokens > 0, "no usage chunk with include_usage")


def check_completions(client, model):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    check(r.object == "text_completion", f"object {r.object!r}")
    check(r.id.startswith("cmpl-"), f"id {r.id!r}")
    choice = r.choices[0]
    check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
    check(r.usage is not None and r.usage.completion_tokens > 0, "usage")
    lp = choice.logprobs
    check(lp is not None, "logprobs missing")
    n = len(lp.tokens)
    check(n == r.usage.completion_tokens, f"{n} logprob tokens for {r.usage.completion_tokens}")
    check(len(lp.token_logprobs) == n and len(lp.top_logprobs) == n and len(lp.text_offset) == n, "logprobs columns")
    check(all(1 <= len(t) <= 2 for t in lp.top_logprobs), "top_logprobs sizes")

    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        check(chunk.object == "text_completion", f"chunk object {chunk.object!r}")
        for c in chunk.choices:
            pieces.append(c.text)
            if c.finish_reason is not None:
                finish = c.finish_reason
    text = "".join(pieces)
    check(text == choice.text, f"streamed {text!r} != non-streamed {choice.text!r}")
    check(finish == choice.finish_reason, f"stream finish_reason {finish!r}")


def check_adapter(client, adapter):
    r = client.chat.completions.create(model=adapter, messages=MESSAGES, max_tokens=8, temperature=0)
    check(r.model == adapter, f"model echoed as {r.model!r}")
    check(r.choices[0].finish_reason in ("stop", "length"), "adapter finish_reason")
    check(r.usage.completion_tokens > 0, "adapter completion_tokens")


def check_unknown_model(client):
    try:
        client.chat.completions.create(model="no-such-model-xyz", messages=MESSAGES, max_tokens=2)
    except openai.NotFoundError:
        return
    raise AssertionError("an unknown model did not raise openai.NotFoundError")


def main(argv):
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    base_url, model = argv[1].rstrip("/"), argv[2]
    adapter = argv[3] if len(argv) == 4 and argv[3] else None
    client = OpenAI(
        base_url=base_url + "/v1",
        api_key=os.environ.get("OPENAI_API_KEY", "unused"),
        max_retries=2,
        timeout=120,
    )
    steps = [
        ("models", lambda: check_models(client, model, adapter)),
    ]
    state = {}

    def chat():
        state["chat"] = check_chat(client, model)

    steps += [
        ("chat", chat),
        ("chat stream", lambda: check_chat_stream(client, model, *state["chat"])),
        ("completions", lambda: check_completions(client, model)),
    ]
    if adapter is not None:
        steps.append(("adapter chat", lambda: check_adapter(client, adapter)))
    steps.append(("unknown model", lambda: check_unknown_model(client)))
    for name, step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            print(f"openai client: FAILED at {name}: {e}", file=sys.stderr)
            return 1
        print(f"openai client: {name} ok")
    print("openai client: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
