"""Offline fixtures: a tiny GIT saved with save_pretrained (untrained, without dropout, and one
trained once per session), synthetic datasets on disk; and a reader of a child process's output
that gives up after a timeout."""
import contextlib
import fcntl
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# No test may touch the network: the Hub is unreachable here and in CI.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The preprocessed-image cache of this test session (subprocesses inherit it), not the user's.
os.environ["GIT_CAPTION_CACHE"] = tempfile.mkdtemp(prefix="git-caption-cache-")
# `make test` runs the suite in two processes (pytest-xdist), one core each: two torch processes with
# a thread per core each would share two cores four ways. Subprocesses inherit it; a test that
# measures threads (torchrun's ranks, infer's readers) sets its own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["GIT_CAPTION_CACHE"], ignore_errors=True)


# After the environment above: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
from captioning import sources, synthetic  # noqa: E402
from captioning.gitmodel import build_tiny_git  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny GIT with a WordPiece tokenizer learned from synthetic captions."""
    out = str(tmp_path_factory.mktemp("tiny-git"))
    captions = [synthetic.scene(0, i)[1] for i in range(300)]
    return build_tiny_git(captions, out, seed=0)


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    """40 synthetic scenes written as an HF imagefolder (PNG files + metadata.jsonl)."""
    out = str(tmp_path_factory.mktemp("imagefolder"))
    sources.write_imagefolder(synthetic.dataset(40, seed=1), out)
    return out


@pytest.fixture(scope="session")
def no_dropout_model(tmp_path_factory, tiny_model_dir):
    """The tiny GIT without dropout: runs that cut the same batches differently (ranks, accumulation)
    then compute the same function."""
    out = tmp_path_factory.mktemp("no-dropout")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


# 1,000 scenes with train.py's default --seed 42 and --test-size 0.1: 900 to train on, 100 to evaluate.
# The tiny GIT first learns the captions' grammar and writes one caption for every image; it starts
# to look at the image between steps 200 and 400 of 16 (measured: after 200 steps the best-by-WER
# model wrote the same caption for all of 11 new scenes; after 500, 11 different ones, held-out WER
# 0.37). --precision auto: bf16 on a CPU with bf16 units, where 500 steps cost what 200 did in fp32 (45 s);
# fp32 on one without (AVX2 only: 141 s, where bf16 emulated took over 20 minutes), with the same course:
# one caption for all at step 100, 13% distinct at 200, then 39-62%, WER 0.49 at step 500.
TRAINED_RUN = ["--dataset", "synthetic", "--synthetic-size", "1000", "--model", "tiny", "--batch-size", "16",
               "--grad-accum", "1", "--learning-rate", "5e-4", "--warmup-steps", "20", "--precision", "auto",
               "--max-steps", "500", "--eval-steps", "100", "--save-steps", "250", "--logging-steps", "25",
               "--num-examples", "2"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The output folder of a tiny GIT trained from scratch (tokenizer learned from the captions) for
    500 steps: one training for the whole session, shared by the tests of training and captioning. What
    it printed is in OUT.stdout. Under `make test`'s two processes (pytest-xdist) the first to ask
    trains it and the other waits on the lock, then reads the same folder."""
    import train  # here: a test that needs no training must not need train.py to import

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder that holds each worker's own
    out = str(shared / "trained-run")
    with open(shared / "trained-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(out + ".stdout"):  # written last: the run is complete
            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                train.main([*TRAINED_RUN, "--output-dir", out])
            with open(out + ".stdout", "w") as f:
                f.write(said.getvalue())
    return out


class Lines:
    """The lines a child writes to a pipe, read by a thread into a queue: a test waiting for a line
    fails after its timeout instead of hanging on a child that hung."""

    def __init__(self, pipe):
        self.queue = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe):
        for line in pipe:
            self.queue.put(line)
        self.queue.put(None)  # the child closed the pipe

    def so_far(self):
        """The lines written and not yet read, without waiting."""
        lines = []
        while not self.queue.empty():
            line = self.queue.get()
            lines += [line] if line is not None else []
        return lines

    def read(self, timeout, until=None):
        """The lines up to the first one for which until(line) is true (to the end of the output
        when until is None); AssertionError when time runs out, or the output ends first."""
        deadline, seen = time.monotonic() + timeout, []
        while True:
            try:
                line = self.queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(f"no {'end of output' if until is None else 'such line'} within {timeout} s; "
                                     f"last lines: {''.join(seen[-20:])}") from None
            if line is None:
                if until is None:
                    return seen
                raise AssertionError(f"the output ended before the line waited for: {''.join(seen[-20:])}")
            seen.append(line)
            if until is not None and until(line):
                return seen


def descendants(pid):
    """The PIDs of a process's children, theirs, and so on (Linux /proc), read now."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def where(pids):
    """What each process is doing (state and kernel wait channel): for a message when one hangs."""
    said = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            waits = []
            for task in sorted(os.listdir(f"/proc/{pid}/task")):
                with open(f"/proc/{pid}/task/{task}/wchan") as f:
                    waits.append(f.read().strip() or "-")
            said.append(f"{pid} {state} waiting in {','.join(waits)}")
        except OSError:
            said.append(f"{pid} gone")
    return "; ".join(said)


def running(pid):
    """Whether a process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_until_gone(pids, timeout=30):
    """Wait for processes to end (the kernel ends them asynchronously); AssertionError naming those
    still running after timeout seconds."""
    deadline = time.monotonic() + timeout
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if running(pid)]
    assert not left, f"processes still running {timeout} s after their parent ended: {left}"


class Child:
    """A command in its own process group with its stdout and stderr as Lines; leaving the block
    kills what is left of the group (a hung child, or ranks its launcher left behind)."""

    def __init__(self, cmd, **kwargs):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, **kwargs)
        self.stdout, self.stderr = Lines(self.proc.stdout), Lines(self.proc.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group had ended
        self.proc.wait()
        return False
