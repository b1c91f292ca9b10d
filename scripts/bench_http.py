"""Load test of `POST /chat` on a running head: N requests at concurrency C, each asking for
`max_tokens` greedy tokens; prints p50/p99 latency, time to completion and tokens/s.

    python scripts/bench_http.py URL [--requests N] [--concurrency C ...] [--max-tokens 32]
"""
import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Give me a short tip for learning Rust.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Suggest a name for a cat.",
    "What does a CPU do?",
]


def one(url, i, max_tokens):
    body = json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                       "temperature": 0, "stop": []}).encode()
    req = urllib.request.Request(url + "/chat", data=body, headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def pct(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def run(url, requests, concurrency, max_tokens):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one(url, i, max_tokens), range(requests)))
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": requests, "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "mean_ms": statistics.mean(lat) * 1e3,
            "tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--requests", type=int, default=0, help="default: 8 x concurrency, at least 16")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    one(args.url, 0, 4)  # warm up
    rows = []
    for c in args.concurrency:
        n = args.requests or max(16, 8 * c)
        rows.append(run(args.url, n, c, args.max_tokens))
    print(f"POST /chat, max_tokens {args.max_tokens}, greedy")
    print(f"{'clients':>8} {'requests':>9} {'p50 ms':>9} {'p99 ms':>9} {'tokens/s':>9} {'vs 1 client':>12}")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(f"{r['concurrency']:>8} {r['requests']:>9} {r['p50_ms']:>9.0f} {r['p99_ms']:>9.0f} "
              f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>11.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
