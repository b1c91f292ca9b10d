#!/usr/bin/env python3
"""The official `openai` client streaming across a lost replica (tests/failover.rs drives it).

    python tests/failover_client.py BASE_URL MODEL N

Asks N greedy chat completions without streaming (the answers to expect), then streams the same
N at once (`stream_options.include_usage`). Once every stream has its first content it prints
"streaming" and waits for a line on stdin (the test kills a worker meanwhile); then it reads the
streams to their end and checks each against its expected answer: content, finish_reason, usage.
Prints "failover client: ok" and exits 0 when all match; exits 1 otherwise.
"""

import sys
import threading
import traceback

from openai import OpenAI


def request(model, i):
    extra = {"min_tokens": 100} if i % 2 == 0 else {}
    return dict(
        model=model,
        messages=[{"role": "user", "content": f"Tell story number {i}."}],
        max_tokens=100,
        temperature=0,
        extra_body=extra,
    )


def main():
    base, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

    expected = [None] * n

    def ask(i):
        r = client.chat.completions.create(**request(model, i))
        expected[i] = (r.choices[0].message.content, r.choices[0].finish_reason, r.usage)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    begun = threading.Barrier(n + 1)
    killed = threading.Event()
    got = [None] * n
    errors = []

    def stream(i):
        try:
            chunks = iter(
                client.chat.completions.create(
                    **request(model, i), stream=True, stream_options={"include_usage": True}
                )
            )
            content, finish, usage = "", None, None
            waited = False
            for chunk in chunks:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    content += choice.delta.content or ""
                    finish = choice.finish_reason or finish
                if content and not waited:
                    waited = True
                    begun.wait()
                    killed.wait()
            got[i] = (content, finish, usage)
        except Exception:  # noqa: BLE001
            errors.append(f"stream {i}: {traceback.format_exc()}")
            begun.abort()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        begun.wait()
    except threading.BrokenBarrierError:
        pass
    print("streaming", flush=True)
    sys.stdin.readline()
    killed.set()
    for t in threads:
        t.join()
    for i in range(n):
        if got[i] is None:
            continue
        (c, f, u), (ec, ef, eu) = got[i], expected[i]
        if c != ec:
            errors.append(f"stream {i}: content {c!r} != {ec!r}")
        if f != ef:
            errors.append(f"stream {i}: finish_reason {f} != {ef}")
        if u is None or (u.prompt_tokens, u.completion_tokens) != (eu.prompt_tokens, eu.completion_tokens):
            errors.append(f"stream {i}: usage {u} != {eu}")
    if errors:
        print("\n".join(errors), flush=True)
        sys.exit(1)
    print("failover client: ok", flush=True)


if __name__ == "__main__":
    main()
