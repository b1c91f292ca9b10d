"""Realistic arrivals against one OpenAI-compatible server (scripts/bench-arrivals.sh drives it).

    python scripts/bench_arrivals.py URL --server tessera|llama --rate R --duration S [--seed 7]
        [--slo-ttft 1.0] [--slo-tpot 0.1]

Requests arrive as a Poisson process of rate R per second for S seconds; each one's prompt and
output lengths are drawn (seeded, so both servers get the same requests in the same order) from
long-tailed distributions: prompt ~ lognormal around 100 tokens (16 to 1,024), output ~ lognormal
around 64 tokens (8 to 256), every output token generated (Tessera: `min_tokens`, llama-server:
`ignore_eos`). Each request streams `/v1/completions` (the official `openai` client, async); its time to first token (TTFT), the gaps
between its chunks (ITL) and its time per output token after the first (TPOT) are recorded.
Goodput: requests per second that met both SLOs (TTFT <= --slo-ttft, TPOT <= --slo-tpot), over
the arrival window. Prints one JSON object.
"""
import argparse
import asyncio
import json
import math
import random
import statistics
import time

from openai import AsyncOpenAI

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be "
         "river mountain quiet engine garden letter market winter system harbor signal forest "
         "window history promise lantern journey silver morning painter robot ocean").split()


def draw(rng, median, sigma, low, high):
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def requests(seed, rate, duration):
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        prompt_tokens = draw(rng, 100, 0.9, 16, 1024)
        # About 1.3 tokens a word for this word list with SmolLM2's tokenizer.
        words = [rng.choice(WORDS) for _ in range(max(4, int(prompt_tokens / 1.3)))]
        out.append((t, " ".join(words), draw(rng, 64, 0.7, 8, 256)))


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def one(client, server, model, at, prompt, max_tokens, t0, results):
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    extra = {"min_tokens": max_tokens} if server == "tessera" else {"ignore_eos": True}
    sent = time.perf_counter()
    stamps = []
    ok = False
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt,
            max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra)
        async for chunk in stream:
            if any(c.text for c in chunk.choices):
                stamps.append(time.perf_counter())
        ok = True
    except Exception:  # noqa: BLE001 (a failed request counts as failed, whatever failed)
        ok = False
    results.append({"sent": sent, "stamps": stamps, "ok": ok and bool(stamps), "max_tokens": max_tokens})


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--server", choices=["tessera", "llama"], required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--slo-ttft", type=float, default=1.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    a = p.parse_args()
    plan = requests(a.seed, a.rate, a.duration)
    results = []
    client = AsyncOpenAI(base_url=a.url + "/v1", api_key="none", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    t0 = time.perf_counter() + 0.5
    await asyncio.gather(*(one(client, a.server, model, at, prompt, n, t0, results)
                           for at, prompt, n in plan))
    ttft, itl, tpot, good = [], [], [], 0
    for r in results:
        if not r["ok"]:
            continue
        s = r["stamps"]
        first = s[0] - r["sent"]
        ttft.append(first)
        itl.extend(b - a for a, b in zip(s, s[1:]))
        per = (s[-1] - s[0]) / max(1, r["max_tokens"] - 1)
        tpot.append(per)
        if first <= a.slo_ttft and per <= a.slo_tpot:
            good += 1
    ms = lambda v: None if v is None else round(v * 1e3, 1)
    print(json.dumps({
        "server": a.server, "rate": a.rate, "duration_s": a.duration, "requests": len(plan),
        "completed": len(ttft), "failed": len(plan) - len(ttft), "met_slo": good,
        "goodput_rps": good / a.duration, "slo_attainment": good / max(1, len(plan)),
        "output_tokens": sum(n for _, _, n in plan),
        "ttft_ms": {"p50": ms(percentile(ttft, 50)), "p99": ms(percentile(ttft, 99))},
        "itl_ms": {"p50": ms(percentile(itl, 50)), "p99": ms(percentile(itl, 99))},
        "tpot_ms": {"p50": ms(percentile(tpot, 50)), "p99": ms(percentile(tpot, 99))},
        "mean_tpot_ms": ms(statistics.mean(tpot)) if tpot else None,
    }))


if __name__ == "__main__":
    asyncio.run(main())
