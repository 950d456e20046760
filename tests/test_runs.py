"""One run per output folder, a full disk while a checkpoint is written, and a resume that knows
what it resumes."""
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from captioning import batches, checkpoint
import train
from conftest import ROOT, Child, descendants, in_process, wait_until_gone, where

# 60 scenes -> 54 train, 6 eval: batch 8 gives 7 micro-batches an epoch, so 12 steps cross one.
RUN = ["--dataset", "synthetic", "--synthetic-size", "60", "--batch-size", "8", "--grad-accum", "1",
       "--eval-batch-size", "8", "--learning-rate", "1e-3", "--precision", "fp32", "--logging-steps", "2",
       "--num-examples", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_cmd(out, model, *extra, pause_at=None):
    args = [*RUN, "--model", model, "--output-dir", str(out), *extra]
    if pause_at:
        return [sys.executable, os.path.join(ROOT, "tests", "pause.py"), str(pause_at), "--", *args]
    return [sys.executable, os.path.join(ROOT, "train.py"), *args]


def digests(folder):
    """sha256 of every file under folder, but the lock (it names its process) and TensorBoard's
    event files (they hold wall-clock times)."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == checkpoint.LOCK_FILE or name.startswith("events.out.tfevents"):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def test_a_second_run_on_a_busy_output_folder_is_refused_and_touches_nothing(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = ["--max-steps", "8", "--eval-steps", "4", "--save-steps", "4"]
    alone = in_process("train", *train_cmd(out, tiny_model_dir, *args)[2:], env=ENV)
    assert alone.returncode == 0, alone.stderr
    expected = digests(out)
    assert "checkpoint-8/model.safetensors" in expected and "best/model.safetensors" in expected
    shutil.rmtree(out)

    # The first run is held still inside step 6, after checkpoint-4 was written; then a second run
    # (which would otherwise tidy, overwrite or resume) is started on the same folder.
    with Child(train_cmd(out, tiny_model_dir, *args, pause_at=6), env=ENV, stdin=subprocess.PIPE) as first:
        first.stdout.read(timeout=300, until=lambda line: line.strip() == "paused")
        for extra in ([], ["--overwrite-output-dir"], ["--resume"]):
            second = in_process("train", *train_cmd(out, tiny_model_dir, *args, *extra)[2:], env=ENV)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and str(out) in lines[0] and f"process {first.proc.pid}" in lines[0], lines
            assert second.stdout == ""
        first.proc.stdin.write("go\n")
        first.proc.stdin.close()
        first.stdout.read(timeout=300)
        assert first.proc.wait(timeout=60) == 0
    assert digests(out) == expected


# 200 scenes: a train split of 180 rows is three chunks of the cache fill, so two worker processes fill it.
FILL_RUN = ["--synthetic-size", "200", "--max-steps", "2", "--eval-steps", "2", "--save-steps", "2",
            "--preprocessing-num-workers", "2"]


@pytest.fixture(scope="module")
def run_never_stopped(tmp_path_factory, tiny_model_dir):
    """(output folder, cache folder, digests of the files of a run that was never stopped): the runs
    of the test below use the same two paths, so that even training_args.json must come out the same."""
    root = tmp_path_factory.mktemp("fill-stop")
    out, cache = root / "run", root / "cache"
    proc = in_process("train", *train_cmd(out, tiny_model_dir, *FILL_RUN)[2:], env={**ENV, "GIT_CAPTION_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    return out, cache, digests(out)


@contextlib.contextmanager
def stacks_if_it_hangs(child):
    """A wait on a pause.py child that times out fails with what its processes were doing: their
    kernel wait channels and Python stacks (pause.py's faulthandler prints them on SIGUSR1)."""
    try:
        yield
    except (AssertionError, subprocess.TimeoutExpired) as e:
        pids = [child.proc.pid, *descendants(child.proc.pid)]
        waits = where(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        stacks = []
        with contextlib.suppress(AssertionError):  # all they printed in 30 s
            child.stderr.read(30, until=lambda line: stacks.append(line))
        raise AssertionError(f"{e}; processes: {waits}; their stacks and stderr:\n{''.join(stacks)}") from None


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_stopped_while_the_cache_fills_leaves_no_process_and_no_lock(run_never_stopped, tiny_model_dir, stop):
    out, cache, expected = run_never_stopped
    shutil.rmtree(out)
    shutil.rmtree(cache)  # this run fills it again, and is stopped while it does
    env = {**ENV, "GIT_CAPTION_CACHE": str(cache)}
    cmd = [sys.executable, os.path.join(ROOT, "tests", "pause.py"), "fill", "--", *train_cmd(out, tiny_model_dir,
                                                                                             *FILL_RUN)[2:]]
    with Child(cmd, env=env) as child:
        with stacks_if_it_hangs(child):
            held = [child.stdout.read(120, until=lambda line: line.startswith("filling "))[-1] for _ in range(2)]
        fillers = sorted(int(line.split()[1]) for line in held)
        assert sorted(descendants(child.proc.pid)) == fillers  # both hold the run's and the cache's locks
        os.kill(child.proc.pid, stop)  # to train.py alone, as `timeout`, `docker stop` or a scheduler send it
        with stacks_if_it_hangs(child):
            status = child.proc.wait(60)
        if stop == signal.SIGTERM:
            assert status == 0
            said = child.stdout.read(30)
            assert said[-1] == ("stopped by SIGTERM outside the training loop; no step was trained: run the same "
                                "command again (the image cache keeps what it finished)\n"), said
            assert "Traceback" not in "".join(child.stderr.read(30))
            assert not any(".tmp-" in name for name in os.listdir(cache))  # the unfinished fill was removed
        else:
            assert status == -signal.SIGKILL
        wait_until_gone(fillers)
    # At once, the same command on the same folder and cache: neither refused nor waiting, and it ends
    # as the run that was never stopped did.
    again = in_process("train", *train_cmd(out, tiny_model_dir, *FILL_RUN)[2:], env=env)
    assert again.returncode == 0, again.stderr
    assert "waiting for another process" not in again.stdout + again.stderr
    if stop == signal.SIGKILL:  # the killed fill's folder is named and removed
        assert "the unfinished image cache fill of process" in again.stdout
    assert digests(out) == expected


@pytest.mark.slow
def test_a_stop_between_a_worker_s_fork_and_the_pool_s_note_of_it_leaves_no_process(tmp_path, tiny_model_dir):
    """The stop lands the instant the fill's second worker is forked, before ProcessPoolExecutor
    has recorded it: that worker too is ended, and the run exits (an unknown worker would be waited
    for at exit, forever)."""
    out, env = tmp_path / "run", {**ENV, "GIT_CAPTION_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, os.path.join(ROOT, "tests", "pause.py"), "spawn", "--",
           *train_cmd(out, tiny_model_dir, *FILL_RUN)[2:]]
    started = []

    def second_start(line):
        if line.startswith("started "):
            started.append(int(line.split()[1]))
        return len(started) == 2

    with Child(cmd, env=env) as child:
        child.stdout.read(120, until=second_start)
        with stacks_if_it_hangs(child):
            status = child.proc.wait(60)
        said = "".join(child.stdout.read(30))
    assert status == 0, said
    assert said.splitlines()[-1].startswith("stopped by SIGTERM outside the training loop"), said
    wait_until_gone(started)


def test_the_lock_is_released_when_the_run_ends_even_by_an_error(tmp_path, tiny_model_dir):
    with pytest.raises(SystemExit):  # a bad dataset stops the run after the lock was taken
        train.main([*RUN, "--model", tiny_model_dir, "--output-dir", str(tmp_path), "--dataset", str(tmp_path / "no")])
    checkpoint.release_folder(checkpoint.lock_folder(str(tmp_path)))  # free again, in this very process


@pytest.fixture
def small_disk(tmp_path):
    """A factory of tmpfs folders of a given size: a real filesystem that fills up."""
    mounted = []

    def make(name, megabytes):
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def folder_megabytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2 ** 20


@pytest.mark.parametrize("room", ["weights", "optimizer"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_earlier_ones_load(tmp_path, tiny_model_dir,
                                                                                small_disk, room):
    # Measure one checkpoint on an ordinary disk, then size the small disk so that the second
    # checkpoint runs out of room in its weights (safetensors) or in its optimizer state (torch.save).
    args = ["--max-steps", "6", "--save-steps", "2", "--eval-steps", "100", "--save-total-limit", "0"]
    probe = tmp_path / "probe"
    train.main([*RUN, "--model", tiny_model_dir, "--output-dir", str(probe), "--max-steps", "2", "--save-steps", "2",
                "--eval-steps", "100"])
    one = folder_megabytes(probe / "checkpoint-2")
    weights = os.path.getsize(probe / "checkpoint-2" / "model.safetensors") / 2 ** 20
    others = folder_megabytes(probe) - one - folder_megabytes(probe / "best")
    free_for_second = weights / 2 if room == "weights" else weights + 1
    out = small_disk("disk", int(one + others + free_for_second + 1))

    proc = in_process("train", *train_cmd(out, tiny_model_dir, *args)[2:], env=ENV)
    assert proc.returncode == 2, proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and "checkpoint-4" in errors[0] and "No space left on device" in errors[0], errors
    assert "Traceback" not in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in names and not any(n.startswith("checkpoint-4") for n in names), names
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    assert model.num_parameters() > 0
    state = torch.load(out / "checkpoint-2" / checkpoint.STATE_FILE, weights_only=True)
    assert state["step"] == 2


def test_resume_refuses_flags_that_change_the_data_or_the_step_and_accepts_the_others(tmp_path, tiny_model_dir,
                                                                                        capsys):
    args = [*RUN, "--model", tiny_model_dir, "--output-dir", str(tmp_path), "--eval-steps", "100",
            "--save-steps", "4"]
    train.main([*args, "--max-steps", "4"])
    before = digests(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--max-steps", "8", "--resume", "--batch-size", "4", "--seed", "7"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 4 (was 8)" in err[0] and "--seed 7 (was 42)" in err[0], err
    assert "--max-steps" not in err[0]
    assert digests(tmp_path) == before  # refused before anything was written
    with pytest.raises(SystemExit) as e:  # each caption of an image, or one: other samples at each step
        train.main([*args, "--max-steps", "8", "--resume", "--caption-sampling", "all"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--caption-sampling all (was one)" in err[0], err
    assert digests(tmp_path) == before

    # --gradient-checkpointing computes the same step, only with less memory: accepted.
    train.main([*args, "--max-steps", "8", "--resume", "--eval-steps", "2", "--gradient-checkpointing"])
    said = [line for line in capsys.readouterr().out.splitlines() if "changed" in line]
    assert len(said) == 1 and "--eval-steps 2 (was 100)" in said[0] and "--max-steps 8 (was 4)" in said[0], said
    assert "--gradient-checkpointing True (was False)" in said[0], said
    history = json.load(open(tmp_path / "checkpoint-8" / "trainer_state.json"))["history"]
    assert [h["step"] for h in history] == [4, 6, 8]  # the new interval took effect (4 is the last step of run 1)


def test_the_data_position_is_kept_in_samples_so_any_number_of_ranks_continues_it():
    # 21 samples, 5 taken by one process; 1, 2 or 3 ranks then take the rest between them, none twice.
    one = batches.EpochSampler(21, seed=3)
    one.set_epoch(2)
    order = list(one)
    for world in (1, 2, 3):
        rest = []
        for rank in range(world):
            sampler = batches.EpochSampler(21, seed=3, num_replicas=world, rank=rank)
            sampler.set_epoch(2, start=5)
            taken = list(sampler)
            assert len(taken) == len(sampler)
            rest += taken
        padding = -21 % world  # DistributedSampler repeats the first samples so every rank gets as many
        assert sorted(rest) == sorted(order[5:] + order[:padding])


def test_resume_says_where_it_continues_in_samples(tmp_path, tiny_model_dir, capsys):
    args = [*RUN, "--model", tiny_model_dir, "--output-dir", str(tmp_path), "--eval-steps", "100", "--save-steps", "3"]
    train.main([*args, "--max-steps", "3"])
    capsys.readouterr()
    train.main([*args, "--max-steps", "4", "--resume"])
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'checkpoint-3'} at step 3 (epoch 0, sample 24 of 54)" in out
    state = torch.load(tmp_path / "checkpoint-4" / checkpoint.STATE_FILE, weights_only=True)
    assert state["samples_done"] == 32 and state["epoch"] == 0
    assert load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
