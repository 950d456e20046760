"""serve.py under load from locust (headless, loopback only, bounded in time), beside infer.py offline.

    python bench/serve_load.py --model demo-run/best --label small       # a trained small model
    python bench/serve_load.py --model base-scratch --label git-base     # git-base's size, random weights
    python bench/serve_load.py --model M --soak 60                       # also the 60 s soak, 1 in 10 bad

Writes --photos 1280 x 960 JPEG photos (bench/photos.py) once, then measures, one after the other
(nothing else should run on the machine):
- infer.py's offline images/s on those photos: (N - 16) / (time for N - time for 16), so that
  loading the model cancels out (after a warm-up run: a cold first start would inflate it);
- serve.py (--max-batch-size, 16 by default) at each --clients level: locust users in a closed loop (each sends
  its next request when the last is answered), one photo a request, for --seconds each: requests/s
  and p50/p95/p99 latency; the same at 32 clients with --max-batch-size 1;
- with --soak S: S seconds at 64 clients, every tenth request a bad one (locustfile.py's kinds):
  statuses of good and bad requests, and the server's resident memory sampled every second.
Each server runs under /usr/bin/time -v, whose peak resident memory is reported.
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

SERVE_LENGTH = 20  # --max-length for every server and infer.py run: a random model never ends earlier


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved model, or base-scratch (built here, random weights)")
    p.add_argument("--label", default=None, help="the name of this model in the results")
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--clients", default="1,8,32,64")
    p.add_argument("--max-batch-size", type=int, default=16, help="of the batching server")
    p.add_argument("--seconds", type=int, default=20, help="per level")
    p.add_argument("--soak", type=int, default=0, help="seconds of the soak at 64 clients (0: none)")
    p.add_argument("--work", default="/tmp/serve-load")
    p.add_argument("--json", help="append the results to this JSON file (a list, one entry per run)")
    return p.parse_args(argv)


def prepare(args):
    photos = os.path.join(args.work, f"photos-{args.photos}")
    if not os.path.exists(os.path.join(photos, "metadata.jsonl")):
        subprocess.run([sys.executable, os.path.join(HERE, "photos.py"), "--out", photos, "--n", str(args.photos)],
                       check=True)
    model = args.model
    if model == "base-scratch":
        from captioning.gitmodel import build_tiny_git
        from captioning import synthetic

        model = os.path.join(args.work, "model-base-scratch")
        if not os.path.exists(os.path.join(model, "config.json")):
            build_tiny_git([synthetic.scene(0, i)[1] for i in range(300)], model, preset="base-scratch", seed=0)
    return photos, model


def infer_images_per_second(model, photos):
    """infer.py's offline throughput on the photos, its start-up cancelled out."""
    files = sorted(os.path.join(photos, f) for f in os.listdir(photos) if f.endswith(".jpg"))

    def seconds(items):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--model", model, "--max-length",
                        str(SERVE_LENGTH), "--batch-size", "16", *items], check=True, stdout=subprocess.DEVNULL,
                       cwd=ROOT)
        return time.perf_counter() - t0

    seconds(files[:16])  # a warm-up: the first run reads torch and the model from a cold disk cache
    few, all_ = seconds(files[:16]), seconds(files)
    return (len(files) - 16) / (all_ - few)


class Server:
    """serve.py under /usr/bin/time -v on a free port; its memory sampled while it runs."""

    def __init__(self, model, *flags):
        self.log = open(os.path.join("/tmp", f"serve-load-{os.getpid()}-{time.time_ns()}.err"), "w+")
        self.proc = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "serve.py"),
                                      "--model", model, "--port", "0", "--max-length", str(SERVE_LENGTH),
                                      "--max-queue", "1024", *flags],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
        if not found:
            self.proc.kill()
            sys.exit(f"serve.py did not start: {line!r}")
        self.url = found.group(1)
        self.python = int(subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                         text=True).stdout.split()[0])
        self.rss, self._sampling = [], True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        t0 = time.perf_counter()
        while self._sampling:
            try:
                with open(f"/proc/{self.python}/status") as f:
                    kib = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
                self.rss.append((round(time.perf_counter() - t0, 1), kib // 1024))
            except (OSError, AttributeError):
                return
            time.sleep(1)

    def stop(self):
        self._sampling = False
        os.kill(self.python, signal.SIGTERM)  # serve.py itself: /usr/bin/time would not pass it on
        self.proc.wait(120)
        self.log.seek(0)
        text = self.log.read()
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        failures = [line for line in text.splitlines() if re.match(r"^[45]\d\d ", line)]
        return {"peak_rss_mib": int(peak.group(1)) // 1024 if peak else None, "exit_status": self.proc.returncode,
                "failure_lines": len(failures), "tracebacks": text.count("Traceback")}


def locust(url, photos, clients, seconds, bad_every=0):
    """One headless locust run: aggregated requests/s and latency percentiles, and the status tally."""
    prefix = os.path.join("/tmp", f"locust-{os.getpid()}-{clients}")
    tally = prefix + "-tally.json"
    env = {**os.environ, "SERVE_PHOTOS": photos, "SERVE_BAD_EVERY": str(bad_every), "SERVE_TALLY": tally}
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "locust"), "-f", os.path.join(HERE, "locustfile.py"),
                    "--headless", "-u", str(clients), "-r", str(clients), "-t", f"{seconds}s", "--host", url,
                    "--csv", prefix, "--only-summary", "--stop-timeout", "60", "--exit-code-on-error", "0"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(prefix + "_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    good = rows.get("good", total)
    with open(tally) as f:
        statuses = json.load(f)
    return {"clients": clients, "seconds": seconds, "requests": int(total["Request Count"]),
            "requests_per_second": float(good["Requests/s"]),
            **{f"p{q}_ms": float(good[f"{q}%"]) for q in (50, 95, 99)}, "statuses": statuses}


def main():
    args = parse_args()
    os.makedirs(args.work, exist_ok=True)
    photos, model = prepare(args)
    result = {"model": args.label or args.model, "photos": args.photos, "max_length": SERVE_LENGTH,
              "max_batch_size": args.max_batch_size,
              "date": time.strftime("%Y-%m-%d")}
    result["infer_images_per_second"] = infer_images_per_second(model, photos)
    print(f"infer.py offline: {result['infer_images_per_second']:.2f} images/s", flush=True)
    server = Server(model, "--max-batch-size", str(args.max_batch_size))
    result["levels"] = []
    for clients in map(int, args.clients.split(",")):
        level = locust(server.url, photos, clients, args.seconds)
        result["levels"].append(level)
        print(f"{clients:>3} clients: {level['requests_per_second']:.2f} req/s, p50 {level['p50_ms']:.0f} ms, "
              f"p95 {level['p95_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms", flush=True)
    if args.soak:
        server.rss.clear()
        soak = locust(server.url, photos, 64, args.soak, bad_every=10)
        soak["rss_mib_by_second"] = server.rss[:]
        result["soak"] = soak
        print(f"soak: {soak['statuses']}", flush=True)
    result["server"] = server.stop()
    one = Server(model, "--max-batch-size", "1")
    result["batch_size_1_at_32"] = locust(one.url, photos, 32, args.seconds)
    result["batch_size_1_server"] = one.stop()
    print(f"--max-batch-size 1, 32 clients: {result['batch_size_1_at_32']['requests_per_second']:.2f} req/s",
          flush=True)
    print(json.dumps(result, indent=1))
    if args.json:
        previous = json.load(open(args.json)) if os.path.exists(args.json) else []
        with open(args.json, "w") as f:
            json.dump([*previous, result], f, indent=1)


if __name__ == "__main__":
    shutil.which("locust") or os.path.exists(os.path.join(os.path.dirname(sys.executable), "locust")) or sys.exit(
        "locust is not installed: pip install -r requirements-bench.txt")
    main()
