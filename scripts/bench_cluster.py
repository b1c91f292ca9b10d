"""Cluster figures on this machine: the added latency of a remote replica (p50 over 200 small chat
requests, head-local replica vs a worker's), and the time to detect a killed worker and to resume
its fine-tune job on another worker.

    python scripts/bench_cluster.py TESSERA_BINARY MODEL
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(url, body=None, method=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


class Cluster:
    def __init__(self, binary, model, work, local_slots):
        self.binary, self.model, self.work = binary, model, work
        self.http, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.procs = []
        sets = [f'adapters.root="{work}/adapters"', f'training.data_root="{work}/data"',
                f'jobs.db_path="{work}/jobs-{self.http}.sqlite"', f"cluster.port={self.port}",
                f"resources.cpu_inference_slots={local_slots}", f"resources.cpu_training_slots={local_slots}"]
        args = [binary, "head", "--port", str(self.http), "--model", model]
        for s in sets:
            args += ["--set", s]
        self.spawn(args, "head")

    def spawn(self, args, name):
        log = open(os.path.join(self.work, f"{name}-{self.http}.log"), "w")
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        self.procs.append(p)
        return p

    def worker(self, name):
        # A worker acts only on paths inside its own roots: the head's, as with shared storage.
        roots = [f'adapters.root="{self.work}/adapters"', f'training.data_root="{self.work}/data"']
        args = [self.binary, "worker", "--join", f"127.0.0.1:{self.port}", "--model", self.model]
        for s in roots:
            args += ["--set", s]
        return self.spawn(args, name)

    def workers(self):
        try:
            return call(self.url + "/cluster")["workers"]
        except Exception:
            return []

    def wait(self, check, timeout=120):
        t0 = time.perf_counter()
        while True:
            try:
                if check():
                    return time.perf_counter() - t0
            except Exception:
                pass
            if time.perf_counter() - t0 > timeout:
                raise SystemExit("timed out")
            time.sleep(0.02)

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()


def latency(c, n=200):
    body = {"prompt": "Say hi.", "max_tokens": 1, "temperature": 0}
    for _ in range(5):
        call(c.url + "/chat", body)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(c.url + "/chat", body)
        lat.append(time.perf_counter() - t0)
    return statistics.median(lat) * 1e3, sorted(lat)[int(0.99 * (n - 1))] * 1e3


def main():
    binary, model = sys.argv[1], sys.argv[2]
    work = tempfile.mkdtemp()
    os.makedirs(f"{work}/data")
    with open(f"{work}/data/d.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"text": f"record {i} holds {i * 5}"}) + "\n")

    local = Cluster(binary, model, work, 1)
    local.wait(lambda: call(local.url + "/ready")["ready"])
    lp50, lp99 = latency(local)
    local.close()

    remote = Cluster(binary, model, work, 0)
    remote.worker("w1")
    remote.wait(lambda: len(remote.workers()) == 1)
    rp50, rp99 = latency(remote)

    # A job on a worker; kill that worker after a checkpoint; a second worker takes it over.
    w2 = remote.worker("w2")
    remote.wait(lambda: len(remote.workers()) == 2)
    hp = {"num_epochs": 30, "lora_r": 8, "batch_size": 4, "gradient_accumulation_steps": 1,
          "max_seq_length": 32, "save_every_steps": 5}
    job = call(remote.url + "/fine-tune", {"dataset_path": "d.jsonl", "output_path": f"bench-{remote.http}",
                                           "hyperparameters": hp})["job_id"]
    get = lambda: call(f"{remote.url}/jobs/{job}")
    remote.wait(lambda: (get().get("progress") or {}).get("step", 0) >= 7, 300)
    node = get()["node"]
    victim = next(p for p in remote.procs[1:] if str(p.pid) in node)
    victim.kill()
    t_kill = time.perf_counter()
    remote.wait(lambda: node not in [w["info"]["node"] for w in remote.workers()])
    detect = time.perf_counter() - t_kill
    remote.wait(lambda: get()["status"] == "running" and get()["node"] != node)
    reassigned = time.perf_counter() - t_kill
    remote.wait(lambda: get()["attempts"] == 2 and (get().get("progress") or {}).get("step", 0) >= 11, 300)
    first_new_step = time.perf_counter() - t_kill
    remote.wait(lambda: get()["status"] in ("succeeded", "failed"), 600)
    final = get()
    remote.close()

    print("chat, max_tokens 1, 200 sequential requests")
    print(f"{'replica':>8} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'local':>8} {lp50:>8.1f} {lp99:>8.1f}")
    print(f"{'remote':>8} {rp50:>8.1f} {rp99:>8.1f}")
    print(f"remote adds {rp50 - lp50:.1f} ms at p50 ({rp50 / lp50:.2f}x)")
    print(f"killed worker: seen gone after {detect * 1e3:.0f} ms, job running elsewhere after "
          f"{reassigned * 1e3:.0f} ms, new steps after {first_new_step:.1f} s; resumed from step "
          f"{final['summary'] and final['summary'].get('resumed_from_step')}, final status {final['status']}")


if __name__ == "__main__":
    main()
