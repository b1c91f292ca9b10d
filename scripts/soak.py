"""A soak of a head and two workers on loopback under steady load, with failures injected.

    python scripts/soak.py TESSERA_BINARY MODEL MINUTES

Load: four clients loop over /chat and /v1/chat/completions (streamed and not, some with an
adapter trained in the run); a fine-tune job is submitted every minute; a deployment is created
and the previous one deleted every two minutes. Failures: a worker is SIGKILLed and started again
every `KILL_EVERY` seconds (alternating), and the head is restarted once (SIGTERM, then started on
the same database) halfway through.

Prints requests ok / moved to another replica when the one serving them was lost (the head's
`tessera_request_failovers_total`, summed over its two lives; those requests count as ok too) /
refused with a retryable answer (429, 503, 504) / not connected (the head restarting; clients
retry every 0.5 s) / failed otherwise (lost); jobs submitted / succeeded / failed / lost (never found again,
or not ended 10 minutes after the load stops: must be 0); and each process's RSS and open file
descriptors at start and end.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

KILL_EVERY = 90


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(url, body=None, method=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def proc_stats(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return f"RSS {rss} MiB, {fds} fds"
    except (OSError, StopIteration):
        return "gone"


class Soak:
    def __init__(self, binary, model, work):
        self.binary, self.work = binary, work
        self.http, self.port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        os.makedirs(f"{work}/models")
        os.makedirs(f"{work}/data")
        self.model = f"{work}/models/{os.path.basename(model)}"
        shutil.copy(model, self.model)
        with open(f"{work}/data/d.jsonl", "w") as f:
            for i in range(32):
                f.write(json.dumps({"prompt": f"Code word {i}?", "completion": f" soak-{i * 7}"}) + "\n")
        self.roots = [f'adapters.root="{work}/adapters"', f'training.data_root="{work}/data"',
                      f'model.models_root="{work}/models"']
        self.head = self.start_head()
        self.workers = {name: self.start_worker(name) for name in ("w1", "w2")}
        self.lock = threading.Lock()
        self.counts = {"ok": 0, "retryable": 0, "unreachable": 0, "failed": 0}
        # Failovers counted by the head's earlier lives (its counters start again at a restart).
        self.moved_before = 0
        self.failures = []
        self.jobs = []
        self.stop = threading.Event()
        self.adapter = None

    def spawn(self, args, name):
        log = open(os.path.join(self.work, f"{name}.log"), "a")
        return subprocess.Popen([self.binary, "--log-format", "json"] + args,
                                stdout=log, stderr=subprocess.STDOUT)

    def start_head(self):
        sets = self.roots + [f'jobs.db_path="{self.work}/jobs.sqlite"', f"cluster.port={self.port}",
                             "resources.cpu_inference_slots=2", "resources.cpu_training_slots=1",
                             "model.replicas=1"]
        args = ["head", "--port", str(self.http), "--model", self.model]
        for s in sets:
            args += ["--set", s]
        return self.spawn(args, "head")

    def start_worker(self, name):
        args = ["worker", "--join", f"127.0.0.1:{self.port}", "--model", self.model]
        for s in self.roots:
            args += ["--set", s]
        return self.spawn(args, name)

    def get(self, path):
        return json.loads(call(self.url + path, timeout=30)[1])

    def wait(self, check, timeout=300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if check():
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise SystemExit("soak: timed out waiting for the cluster")

    def count(self, what, why=None):
        with self.lock:
            self.counts[what] += 1
            if why and len(self.failures) < 20:
                self.failures.append(why)

    def client(self, i):
        n = 0
        while not self.stop.is_set():
            n += 1
            adapter = self.adapter if n % 3 == 0 else None
            try:
                if n % 2:
                    body = {"prompt": f"Client {i} asks question {n}.", "max_tokens": 64, "temperature": 0}
                    if adapter:
                        body["adapter_path"] = adapter
                    status, raw = call(self.url + "/chat", body)
                    ok = status == 200 and json.loads(raw).get("text") is not None
                else:
                    body = {"model": adapter or "default", "stream": n % 4 == 0, "max_tokens": 64,
                            "messages": [{"role": "user", "content": f"Client {i}, turn {n}."}]}
                    if not adapter:
                        body.pop("model")
                    status, raw = call(self.url + "/v1/chat/completions", body)
                    text = raw.decode()
                    ok = status == 200 and ("[DONE]" in text if body["stream"] else '"choices"' in text)
                    if ok and body["stream"] and "event: error" in text:
                        ok = False
                self.count("ok" if ok else "failed", None if ok else f"{status} {raw[:200]!r}")
            except urllib.error.HTTPError as e:
                raw = e.read()
                # A request cut by its replica's loss is lost, whatever its status says.
                cut = b"while serving this request" in raw
                retryable = e.code in (429, 503, 504) and not cut
                self.count("retryable" if retryable else "failed",
                           None if retryable else f"{e.code} {raw[:200]!r}")
                if retryable:
                    # As a client honouring Retry-After would (not a tight loop while no replica
                    # is ready yet).
                    time.sleep(0.5)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                # No connection: the head is restarting.
                self.count("unreachable")
                time.sleep(0.5)

    def submitter(self):
        k = 0
        while not self.stop.is_set():
            hp = {"num_epochs": 1, "lora_r": 4, "batch_size": 8, "max_seq_length": 32}
            try:
                _, raw = call(self.url + "/fine-tune", {"dataset_path": "d.jsonl",
                                                        "output_path": f"soak-{k}", "hyperparameters": hp})
                with self.lock:
                    self.jobs.append(json.loads(raw)["job_id"])
                k += 1
            except Exception:
                pass
            self.stop.wait(60)

    def deployer(self):
        k = 0
        while not self.stop.wait(120):
            try:
                call(self.url + "/models", {"name": f"soak{k}", "path": os.path.basename(self.model)})
                if k:
                    call(f"{self.url}/models/soak{k - 1}", method="DELETE")
                k += 1
            except Exception:
                pass

    def run(self, minutes):
        self.wait(lambda: self.get("/ready")["ready"] and len(self.get("/cluster")["workers"]) == 2)
        start_stats = self.stats()
        # An adapter for the load, trained here.
        _, raw = call(self.url + "/fine-tune", {"dataset_path": "d.jsonl", "output_path": "soak-adapter",
                                                "hyperparameters": {"num_epochs": 1, "lora_r": 4}})
        first = json.loads(raw)["job_id"]
        self.jobs.append(first)
        self.wait(lambda: self.get(f"/jobs/{first}")["status"] == "succeeded", 600)
        self.adapter = "soak-adapter"
        threads = [threading.Thread(target=self.client, args=(i,)) for i in range(4)]
        threads += [threading.Thread(target=self.submitter), threading.Thread(target=self.deployer)]
        for t in threads:
            t.start()
        t0, victim, restarted = time.time(), 0, False
        next_kill = t0 + KILL_EVERY
        while time.time() - t0 < minutes * 60:
            time.sleep(1)
            if time.time() >= next_kill:
                name = ("w1", "w2")[victim % 2]
                victim += 1
                self.workers[name].kill()
                self.workers[name].wait()
                time.sleep(5)
                self.workers[name] = self.start_worker(name)
                next_kill += KILL_EVERY
            if not restarted and time.time() - t0 >= minutes * 30:
                restarted = True
                self.moved_before += self.moved()
                self.head.send_signal(signal.SIGTERM)
                self.head.wait(60)
                self.head = self.start_head()
        self.stop.set()
        for t in threads:
            t.join()
        # Every job ends (a restarted head resumes what it held).
        deadline = time.time() + 600
        states = {}
        while time.time() < deadline:
            states = {}
            for j in self.jobs:
                try:
                    states[j] = self.get(f"/jobs/{j}")["status"]
                except Exception:
                    states[j] = "lost"
            if all(s in ("succeeded", "failed", "cancelled", "lost") for s in states.values()):
                break
            time.sleep(5)
        end_stats = self.stats()
        moved = self.moved_before + self.moved()
        jobs = {s: sum(1 for v in states.values() if v == s) for s in ("succeeded", "failed", "cancelled")}
        lost = len(self.jobs) - sum(jobs.values())
        print(f"soak: {minutes} min, head + 2 workers, a worker killed every {KILL_EVERY} s, one head restart")
        print(f"requests: ok {self.counts['ok']} (moved to another replica {moved}), refused retryable "
              f"(429/503/504) {self.counts['retryable']}, no connection (head restarting, tries 0.5 s "
              f"apart) {self.counts['unreachable']}, failed (lost) {self.counts['failed']}")
        print(f"jobs: submitted {len(self.jobs)}, succeeded {jobs['succeeded']}, failed {jobs['failed']}, "
              f"cancelled {jobs['cancelled']}, lost {lost}")
        for name in start_stats:
            print(f"{name}: start {start_stats[name]}; end {end_stats.get(name, 'gone')}")
        for f in self.failures:
            print("failed request:", f)
        return lost

    def moved(self):
        """The head's `tessera_request_failovers_total`, summed over deployments."""
        try:
            text = call(self.url + "/metrics", timeout=30)[1].decode()
        except Exception:
            return 0
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("tessera_request_failovers_total{"))

    def stats(self):
        procs = {"head": self.head, **self.workers}
        return {name: proc_stats(p.pid) for name, p in procs.items()}

    def close(self):
        for p in [self.head, *self.workers.values()]:
            p.kill()
            p.wait()


def main():
    binary, model, minutes = sys.argv[1], sys.argv[2], float(sys.argv[3])
    work = tempfile.mkdtemp(prefix="tessera-soak-")
    soak = Soak(binary, model, work)
    try:
        lost = soak.run(minutes)
    finally:
        soak.close()
    print(f"logs in {work}")
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
