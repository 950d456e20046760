"""Time and memory of `infer.py` captioning a folder of photos (issue 10), one model at a time.

    python bench/photos.py --out /tmp/photos --n 2000            # the photos, once
    python bench/infer_photos.py --photos /tmp/photos --model M [--model M2 ...] [--json-out r.json]

For each model it runs `infer.py --model M PHOTOS --output OUT.jsonl` under `/usr/bin/time -v`
and reports:
  first caption   seconds from the start of the process to its first caption line on stdout
  total           seconds for the whole run (the wall clock of /usr/bin/time)
  peak RSS        "Maximum resident set size" of /usr/bin/time: the largest single process
                  (infer.py's main process, or one of its workers), in MB
  peak PSS        the largest sum over infer.py and its worker processes of their proportional
                  set size (shared pages counted once), sampled every 0.2 s, in MB: what the
                  run as a whole held, which peak RSS does not show once the work is spread
                  over processes
  decode only     seconds a single-process loop takes to open, fully decode (no JPEG draft) and
                  resize and crop the same files with the model's image processor: no model,
                  no workers; the decoding a streaming run has to hide behind generate

--infer PATH times another infer.py (an older one, say: `git show HEAD~3:infer.py > /tmp/old.py`;
it runs with this repository on PYTHONPATH); --args passes flags on to infer.py
(`--args="--num-workers 0 --batch-size 32"`). Run it alone on the machine.
"""
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from captioning import captioner, cli, gitmodel  # noqa: E402


TIME = "/usr/bin/time"


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("--photos", required=True, help="a folder of images (bench/photos.py writes one)")
    a("--model", action="append", required=True, help="a model for infer.py --model; give it again for more")
    a("--infer", default=os.path.join(ROOT, "infer.py"), help="the infer.py to time (default: this repository's)")
    a("--args", default="", help="more flags for infer.py, as one string")
    a("--output", default="/tmp/infer_photos.jsonl", help="infer.py's --output (deleted before each run)")
    a("--json-out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if not os.path.isdir(args.photos):
        p.error(f"--photos {args.photos!r} is not a folder")
    if not os.path.isfile(args.infer):
        p.error(f"--infer {args.infer!r} does not exist")
    if not os.access(TIME, os.X_OK):
        p.error(f"{TIME} is missing; install GNU time (Debian/Ubuntu: apt-get install -y time)")
    return args


# ---------------------------------------------------------------------------------------------
# Memory of a process tree

def children(pid):
    """The pids whose parent is pid (Linux: /proc/PID/task/*/children)."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # the process has just ended
        pass
    return out


def tree_pss_kb(root):
    """The summed Pss (kB) of root and all its descendants; processes that end meanwhile count 0."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children(pid)
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += int(re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M).group(1))
        except (OSError, AttributeError):
            pass
    return total


class PeakPss:
    """Samples tree_pss_kb(pid) every `every` seconds on a thread until stop(); .peak_kb."""

    def __init__(self, pid, every=0.2):
        self.pid, self.every, self.peak_kb = pid, every, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(self.every):
            self.peak_kb = max(self.peak_kb, tree_pss_kb(self.pid))

    def stop(self):
        self.done.set()
        self.thread.join()


# ---------------------------------------------------------------------------------------------
# One timed run

def time_report(path):
    """The numbers of a `/usr/bin/time -v -o path` report."""
    with open(path) as f:
        text = f.read()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    return rss_kb, seconds


def run_infer(args, model):
    for path in (args.output, args.output + ".partial"):
        if os.path.exists(path):
            os.remove(path)
    report = args.output + ".time.txt"
    cmd = [TIME, "-v", "-o", report, sys.executable, args.infer, "--model", model, args.photos,
           "--output", args.output, *shlex.split(args.args)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    memory = PeakPss(proc.pid)
    stderr = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    drain.start()
    first, lines = None, 0
    for _ in proc.stdout:
        lines += 1
        if first is None:
            first = time.perf_counter() - start
    proc.wait()
    end = time.perf_counter() - start
    memory.stop()
    drain.join()
    if proc.returncode != 0 or not os.path.exists(report):
        tail = "".join(stderr[-5:]).strip()
        raise SystemExit(f"error: infer.py --model {model} exited with status {proc.returncode}: {tail}")
    rss_kb, wall = time_report(report)
    os.remove(report)
    with open(args.output) as f:
        rows = sum(1 for _ in f)
    return {"command": shlex.join(cmd[4:]), "captions_printed": lines, "rows_written": rows,
            "first_caption_seconds": first, "total_seconds": wall, "measured_here_seconds": end,
            "images_per_second": rows / wall, "peak_rss_mb": rss_kb / 1024,
            "peak_pss_all_processes_mb": memory.peak_kb / 1024}


def decode_only(files, model):
    """Seconds for one process to open, fully decode, resize and crop every file with the model's
    image processor (no rescale or normalisation: the part that costs is the pixels)."""
    import transformers
    from PIL import Image


    transformers.logging.set_verbosity_error()
    image_processor = transformers.AutoImageProcessor.from_pretrained(gitmodel.resolve_model(model))
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
        image_processor(images=[rgb], do_rescale=False, do_normalize=False)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)

    files = captioner.expand_inputs([args.photos])
    if not files:
        cli.fail(f"--photos {args.photos!r} holds no images")
    results = []
    for model in args.model:
        print(f"{model}: infer.py on {len(files)} images ...", flush=True)
        row = {"model": model, **run_infer(args, model)}
        print(f"{model}: decode and resize only, one process ...", flush=True)
        row["decode_only_seconds"] = decode_only(files, model)
        results.append(row)

    print(f"\n{len(files)} images in {args.photos}; infer.py {shlex.join(shlex.split(args.args)) or '(default flags)'}")
    header = ("model", "first caption s", "total s", "images/s", "peak RSS MB", "peak PSS MB", "decode only s")
    table = [header] + [(os.path.basename(r["model"].rstrip("/")) or r["model"], f"{r['first_caption_seconds']:.1f}",
                         f"{r['total_seconds']:.1f}", f"{r['images_per_second']:.2f}", f"{r['peak_rss_mb']:.0f}",
                         f"{r['peak_pss_all_processes_mb']:.0f}", f"{r['decode_only_seconds']:.1f}")
                        for r in results]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if args.json_out:
        machine = {"cores": cli.usable_cores(cap=1 << 16), "cpu": platform.processor() or platform.machine(),
                   "python": platform.python_version()}
        with open(args.json_out, "w") as f:
            json.dump({"photos": args.photos, "images": len(files), "infer_args": args.args, "machine": machine,
                       "runs": results}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
