"""Schema-driven fuzzing of a running head with schemathesis (driven by tests/schema_fuzz.rs).

    python tests/schema_fuzz.py BASE_URL EXAMPLES_PER_MODE

Loads BASE_URL/openapi.json and, for every operation, sends EXAMPLES_PER_MODE requests generated
from the schema (valid bodies) and as many generated to violate it (wrong types, missing fields,
out-of-range values). Every response must be below 500, and every error response (>= 400) must be
the API's JSON error: {"error": {"type": str, "message": str, ...}}. Failures are collected (no
shrinking, to keep the run short) and printed; the exit status is 1 if there is any.
"""

import json
import sys
import time

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


def error_shape_problem(response):
    """Why `response` is not a well-formed API error, or None."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return f"not JSON: {response.content[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"no `error` object: {body!r}"[:300]
    for key in ("type", "message"):
        if not isinstance(error.get(key), str) or not error[key]:
            return f"error.{key} missing or not a string: {body!r}"[:300]
    return None


def main():
    base, per_mode = sys.argv[1], int(sys.argv[2])
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures = []
    counts = {}
    started = time.time()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=per_mode,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                counts[label] = counts.get(label, 0) + 1
                try:
                    response = case.call(base_url=base, timeout=60)
                except Exception as e:  # a reset connection is a crash symptom
                    failures.append((label, mode.value, f"request failed: {e!r}", case))
                    return
                status = response.status_code
                if status >= 500:
                    failures.append(
                        (label, mode.value, f"{status}: {response.text[:300]}", case)
                    )
                elif status >= 400:
                    problem = error_shape_problem(response)
                    if problem:
                        failures.append((label, mode.value, f"{status}: {problem}", case))

            try:
                run()
            except Unsatisfiable:
                # Nothing to violate (no parameters, no body): the valid mode covered it.
                pass
    elapsed = time.time() - started
    for label, n in sorted(counts.items()):
        print(f"{n:5d} requests  {label}")
    print(f"{sum(counts.values())} requests in {elapsed:.1f} s, {len(failures)} failures")
    seen = set()
    for label, mode, why, case in failures:
        key = (label, why[:60])
        if key in seen:
            continue
        seen.add(key)
        print(f"FAIL {label} ({mode}): {why}")
        print(f"     body={case.body!r} query={case.query!r} path={case.path_parameters!r}"[:600])
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
