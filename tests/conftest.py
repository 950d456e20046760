"""Offline fixtures: a tiny GIT saved with save_pretrained (untrained, without dropout, and one
trained once per session), synthetic datasets on disk; and a reader of a child process's output
that gives up after a timeout."""
import collections
import contextlib
import importlib
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
    if BACKGROUND is not None and BACKGROUND.poll() is None:  # the session ended before it was needed
        BACKGROUND.kill()
        BACKGROUND.wait()
    shutil.rmtree(os.environ["GIT_CAPTION_CACHE"], ignore_errors=True)


# After the environment above: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
from captioning import sources, synthetic  # noqa: E402
from captioning.gitmodel import build_tiny_git  # noqa: E402
import trained_run as trained_run_script  # noqa: E402
from trained_run import TRAINED_RUN  # noqa: E402,F401  (the tests import it from here)


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


def shared_folder(tmp_path_factory):
    """The session's temporary folder, the one all of `make test`'s worker processes share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the folder of each worker's own


BACKGROUND = None  # the trained run's process, in the worker that started it


def pytest_sessionstart(session):
    """The first worker of several starts the trained run at once, in the background (trained_run.py)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if not os.environ.get("PYTEST_XDIST_WORKER") or factory is None:
        return  # one process: the first test that needs it trains it
    claim = shared_folder(factory) / "trained-run.claimed"
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # the other worker started it
    global BACKGROUND
    BACKGROUND = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "trained_run.py"),
                                   str(shared_folder(factory) / "trained-run")],
                                  stdout=subprocess.DEVNULL, stderr=open(str(claim), "w"))


def pytest_collection_modifyitems(items):
    """The files in the order of the share of their tests that need the trained run (none first), and
    those tests last in their file: under `make test` (which keeps this order: --no-loadscope-reorder)
    the workers do the rest while the run trains in the background, instead of waiting for it."""
    def needs_it(item):
        return "trained_run" in getattr(item, "fixturenames", ())

    tests = collections.defaultdict(list)
    for item in items:
        tests[item.path].append(needs_it(item))
    share = {path: sum(needs) / len(needs) for path, needs in tests.items()}
    items.sort(key=lambda item: (share[item.path], item.path, needs_it(item)))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The output folder of a tiny GIT trained from scratch (tokenizer learned from the captions) for
    500 steps (trained_run.py): one training for the whole session, shared by the tests of training
    and captioning. What it printed is in OUT.stdout."""
    out = trained_run_script.trained(str(shared_folder(tmp_path_factory) / "trained-run"))
    if BACKGROUND is not None and BACKGROUND.poll():  # it failed: say why (the fixture trained it instead)
        print(open(str(shared_folder(tmp_path_factory) / "trained-run.claimed")).read(), file=sys.stderr)
    return out


def in_process(command, *argv, cwd=None, env=None, merged=False):
    """A command's main(argv) run in this process, as a user's shell would see it (exit status, the
    two streams; merged: stderr written into stdout, to see the order of all lines). A new process
    would spend about 5 s importing torch and transformers again. Tests of signals, of what a fresh
    interpreter imports, or of work shared between processes start the command in its own process."""
    import torch
    from captioning import captioner

    module = importlib.import_module(command)
    out = io.StringIO()
    err = out if merged else io.StringIO()
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    captioner.load.cache_clear()  # a model folder a test rewrote is read again, as a new process would
    os.environ.update(env or {})
    if "OMP_NUM_THREADS" in (env or {}):  # read by torch once, at import: a new process would honour it
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = module.main(list(map(str, argv)))
    except SystemExit as e:
        status = e.code
        if isinstance(status, str):  # sys.exit("message"): Python prints it and exits 1
            err.write(status + "\n")
            status = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)  # infer.py sets it for its own process
    return subprocess.CompletedProcess([command, *argv], status if isinstance(status, int) else 0, out.getvalue(),
                                       "" if merged else err.getvalue())


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
