#!/usr/bin/env bash
# Sourced by the benchmark scripts: the shared thread setting and the head's lifecycle.
#
#   bench_threads N      # exports OMP_NUM_THREADS/MKL_NUM_THREADS (N, or all cores when empty/0)
#   bench_start_head LOG ARGS...   # starts `tessera head` on a free port; sets head_pid, head_url
#   bench_stop_head

bench_threads() {
    local n="${1:-0}"
    [ "$n" -gt 0 ] 2>/dev/null || n=$(nproc)
    # torch's OpenMP pool reads these when it loads, in every process (head, engine, Python).
    export OMP_NUM_THREADS="$n" MKL_NUM_THREADS="$n" BENCH_THREADS="$n"
    echo "bench: $n threads on both sides (OMP_NUM_THREADS), $(nproc) cores," \
        "load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}

# Starts a release head with the given extra arguments, logging to LOG; waits until /ready.
# Returns 1 (head stopped, log kept) when it exits or is not ready within 120 s.
bench_start_head() {
    local log="$1"
    shift
    local port
    port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    target/release/tessera head --port "$port" "$@" >"$log" 2>&1 &
    head_pid=$!
    head_url="http://127.0.0.1:$port"
    for _ in $(seq 600); do
        curl -sf "$head_url/ready" >/dev/null && return 0
        kill -0 "$head_pid" 2>/dev/null || { wait "$head_pid" 2>/dev/null; head_pid=; return 1; }
        sleep 0.2
    done
    bench_stop_head
    return 1
}

bench_stop_head() {
    if [ -n "${head_pid:-}" ]; then
        kill "$head_pid" 2>/dev/null || true
        wait "$head_pid" 2>/dev/null || true
        head_pid=
    fi
}
