"""Load tests of a running head, printed as JSON on stdout (progress on stderr).

    python scripts/bench_http.py workload URL --model NAME [--phase base|adapters|prefix] [--runs 3]
        [--clients 32] [--min-tokens 64] [--max-tokens 128] [--prefix-tokens 1000]
        [--prefix-requests 4]
    python scripts/bench_http.py chat URL [--requests N] [--concurrency C ...] [--max-tokens 32]

`workload` is the realistic one: `--clients` concurrent streaming clients of the official `openai`
Python client, each sending a different chat prompt (different lengths, fixed max_tokens per
prompt between the two bounds, greedy), all at once; aggregate tokens/s, time to first token
(TTFT) and inter-token latency (ITL) p50/p99, the median of `--runs` runs after a warm-up of the
same prompts. `--phase structured` sends the same prompts with every other client asking for
JSON under a schema (`response_format`), and reports the mean time of a grammar mask. `--phase
adapters` spreads the clients over 8 adapters (`bench_r16_0..7` under the
head's adapters root); `--phase prefix` sends, one after another, requests that share a
~`--prefix-tokens` system prompt and reports the median TTFT of a new request once the prefix was
seen. `chat` is the older `POST /chat` load test at fixed concurrencies.
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (chat_prompts, load_check, log, median_of, percentile,  # noqa: E402
                          shared_prefix_system)

ADAPTERS = 8


# The schema of `--phase structured`'s constrained half: nested, arrays, enums, bounded strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "maxLength": 200},
        "topics": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 6},
        "tone": {"enum": ["neutral", "positive", "negative"]},
        "details": {"type": "object", "properties": {
            "points": {"type": "array", "items": {"type": "string", "maxLength": 80}},
            "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
            "required": ["points", "confidence"], "additionalProperties": False},
    },
    "required": ["summary", "topics", "tone", "details"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}


async def stream_one(client, model, messages, max_tokens, response_format=None):
    """(start, [arrival time of each content chunk], completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    extra = {"response_format": response_format} if response_format else {}
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra)
    arrivals, tokens = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return t0, arrivals, tokens if tokens is not None else len(arrivals)


def summarise(results):
    """Aggregate figures of a set of concurrent requests [(start, arrivals, tokens)]."""
    start = min(r[0] for r in results)
    end = max((r[1][-1] if r[1] else r[0]) for r in results)
    tokens = sum(r[2] for r in results)
    ttft = [(r[1][0] - r[0]) * 1e3 for r in results if r[1]]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r[1], r[1][1:])]
    return {"tokens": tokens, "wall_s": end - start, "tok_s": tokens / (end - start),
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
            "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99)}


async def concurrent(url, requests):
    """Sends every (model, messages, max_tokens[, response_format]) at once, one connection each."""
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=1200, max_retries=0)
    try:
        return await asyncio.gather(*(stream_one(client, *r) for r in requests))
    finally:
        await client.close()


async def sequential(url, requests):
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=1200, max_retries=0)
    try:
        return [await stream_one(client, m, msgs, n) for m, msgs, n in requests]
    finally:
        await client.close()


def workload(args):
    prompts = chat_prompts(args.clients, args.min_tokens, args.max_tokens)
    if args.phase == "prefix":
        system = shared_prefix_system(args.prefix_tokens)
        questions = [f"In one sentence, what is rule {7 * i + 3} about?"
                     for i in range(args.prefix_requests + 2)]

        def request(q, n):
            return (args.model, [{"role": "system", "content": system},
                                 {"role": "user", "content": q}], n)
        # The first request brings the shared prefix into the cache (where there is one); each
        # later one is a new request on the same prefix.
        load_check("the shared-prefix requests")
        asyncio.run(sequential(args.url, [request(questions[0], 4), request(questions[1], 4)]))
        results = asyncio.run(sequential(args.url, [request(q, 4) for q in questions[2:]]))
        ttft = [(r[1][0] - r[0]) * 1e3 for r in results if r[1]]
        print(json.dumps({"phase": "prefix", "prefix_tokens": args.prefix_tokens,
                          "requests": len(ttft), "ttft_ms": statistics.median(ttft),
                          "ttft_all_ms": ttft}))
        return
    models = ([f"bench_r16_{i % ADAPTERS}" for i in range(len(prompts))]
              if args.phase == "adapters" else [args.model] * len(prompts))
    # `structured`: every other client asks for JSON under SCHEMA (the same prompts otherwise).
    formats = [RESPONSE_FORMAT if args.phase == "structured" and i % 2 == 0 else None
               for i in range(len(prompts))]
    requests = [(m, msgs, n, f) for m, (msgs, n), f in zip(models, prompts, formats)]
    log(f"bench: warm-up of {len(requests)} clients ({args.phase})")
    asyncio.run(concurrent(args.url, [(m, msgs, 4, f) for m, msgs, _, f in requests]))
    masks_before = grammar_masks(args.url)
    out = median_of(args.runs, lambda: summarise(asyncio.run(concurrent(args.url, requests))),
                    f"tessera {len(requests)} streaming clients ({args.phase})")
    masks_after = grammar_masks(args.url)
    masks = masks_after["masks"] - masks_before["masks"]
    if masks:
        out["mask_us"] = (masks_after["microseconds"] - masks_before["microseconds"]) / masks
        out["masks"] = masks
    out.update({"phase": args.phase, "clients": len(requests)})
    print(json.dumps(out))


def grammar_masks(url):
    """The head's `grammar_masks_total` figures, summed over its replicas."""
    totals = {"masks": 0.0, "microseconds": 0.0}
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if "grammar_masks_total{" in line and not line.startswith("#"):
                figure = line.split('figure="', 1)[1].split('"', 1)[0]
                totals[figure] = totals.get(figure, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def chat_one(url, i, max_tokens):
    prompts = [msgs[-1]["content"] for msgs, _ in chat_prompts(8)]
    body = json.dumps({"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                       "temperature": 0, "stop": []}).encode()
    req = urllib.request.Request(url + "/chat", data=body,
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def chat(args):
    chat_one(args.url, 0, 4)  # warm up
    rows = []
    for c in args.concurrency:
        n = args.requests or max(16, 8 * c)
        load_check(f"POST /chat at {c} clients")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            results = list(pool.map(lambda i: chat_one(args.url, i, args.max_tokens), range(n)))
        wall = time.perf_counter() - t0
        lat = [r[0] for r in results]
        tokens = sum(r[1] for r in results)
        rows.append({"concurrency": c, "requests": n, "p50_ms": percentile(lat, 50) * 1e3,
                     "p99_ms": percentile(lat, 99) * 1e3, "tokens_per_s": tokens / wall})
    log(f"POST /chat, max_tokens {args.max_tokens}, greedy")
    log(f"{'clients':>8} {'requests':>9} {'p50 ms':>9} {'p99 ms':>9} {'tokens/s':>9}")
    for r in rows:
        log(f"{r['concurrency']:>8} {r['requests']:>9} {r['p50_ms']:>9.0f} {r['p99_ms']:>9.0f} "
            f"{r['tokens_per_s']:>9.1f}")
    print(json.dumps(rows))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("workload")
    w.add_argument("url")
    w.add_argument("--model", required=True, help="the base model's name")
    w.add_argument("--phase", default="base", choices=["base", "adapters", "prefix", "structured"])
    w.add_argument("--runs", type=int, default=3)
    w.add_argument("--clients", type=int, default=32)
    w.add_argument("--min-tokens", type=int, default=64)
    w.add_argument("--max-tokens", type=int, default=128)
    w.add_argument("--prefix-tokens", type=int, default=1000)
    w.add_argument("--prefix-requests", type=int, default=4)
    c = sub.add_parser("chat")
    c.add_argument("url")
    c.add_argument("--requests", type=int, default=0, help="default: 8 x concurrency, at least 16")
    c.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    c.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    {"workload": workload, "chat": chat}[args.command](args)


if __name__ == "__main__":
    main()
