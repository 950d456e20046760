"""Nothing lost: runs killed with SIGKILL and resumed, half-written checkpoints, failed writes,
and torchrun data parallelism on CPU (gloo) against one process."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from captioning import checkpoint
import infer
import metrics
import train
from conftest import ROOT, TRAINED_RUN, Child, in_process

# 89 scenes -> 80 train, 9 eval. Batch 8 with 2 micro-batches a step: 5 steps an epoch, so the
# runs below cross an epoch boundary; logging every 2 steps and saving every 3 puts the logging
# windows across the checkpoints. The tiny GIT has dropout, so RNG streams must be restored too.
RUN = ["--dataset", "synthetic", "--synthetic-size", "89", "--batch-size", "8", "--grad-accum", "2",
       "--eval-batch-size", "4", "--learning-rate", "1e-3", "--precision", "fp32", "--max-steps", "8",
       "--logging-steps", "2", "--save-steps", "3", "--eval-steps", "4", "--num-examples", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def train_cli(out, model, *extra, crash=None, torchrun=None, env=None):
    """Run train.py in a new process: under tests/crash.py, or under torchrun; in this one (the same
    streams and status, without importing torch again) when neither is asked for."""
    args = [*RUN, "--model", model, "--output-dir", str(out), *extra]
    if crash:
        cmd = [sys.executable, os.path.join(ROOT, "tests", "crash.py"), *crash, "--", *args]
    elif torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun),
               os.path.join(ROOT, "train.py"), *args]
    else:
        return in_process("train", *args, env={**ENV, **(env or {})})
    # torchrun ranks each get one thread, so two ranks share this 2-core machine without oversubscribing it.
    env = {**ENV, "OMP_NUM_THREADS": "1"} if torchrun else {**ENV, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def final_state(out, step=8):
    return torch.load(os.path.join(out, f"checkpoint-{step}", checkpoint.STATE_FILE), weights_only=True)


def weights(out, step=8):
    return load_file(os.path.join(out, f"checkpoint-{step}", "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def scalars(out, tag):
    events = EventAccumulator(os.path.join(out, "runs"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The uninterrupted run with --num-workers 0 or 2 (made on first use, once per module)."""
    runs = {}

    def run(workers):
        if workers not in runs:
            out = tmp_path_factory.mktemp(f"reference-{workers}")
            proc = train_cli(out, tiny_model_dir, "--num-workers", workers)
            assert proc.returncode == 0, proc.stderr
            runs[workers] = str(out)
        return runs[workers]
    return run


# (where to kill, which call, the checkpoint the resume starts from)
KILLS = [("accumulation", 14, 6),  # 2nd micro-batch of step 7: one backward done, no optimizer step yet
         ("evaluation", 2, 3),     # 2nd eval batch at step 4, after step 4 was logged to TensorBoard
         ("checkpoint", 2, 3)]     # half of checkpoint-6/training_state.pt written
# Every kill point in the main process, and with loader workers the one that stops mid-step: the
# workers' seeding on resume does not depend on where the kill fell (each point costs ~18 s).
CASES = [("0", *kill) for kill in KILLS] + [("2", *KILLS[0])]


@pytest.mark.slow
@pytest.mark.parametrize("workers, point, call, resumes_from", CASES, ids=[f"workers{c[0]}-{c[1]}" for c in CASES])
def test_sigkill_then_resume_equals_an_uninterrupted_run(reference, tmp_path, tiny_model_dir, workers, point, call,
                                                         resumes_from):
    ref = reference(workers)
    out = tmp_path / "run"
    killed = train_cli(out, tiny_model_dir, "--num-workers", workers, crash=(point, str(call)))
    assert killed.returncode == -9, killed.stderr
    resumed = train_cli(out, tiny_model_dir, "--num-workers", workers, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / f'checkpoint-{resumes_from}'} at step {resumes_from}" in resumed.stdout
    if point == "checkpoint":  # the half-written folder is named, removed, and not resumed from
        assert any(line.startswith(f"{out}: removed checkpoint-6.tmp-") for line in resumed.stdout.splitlines())
        assert not list(out.glob("*.tmp-*"))

    a, b = final_state(ref), final_state(out)
    assert b["step"] == a["step"] == 8
    assert [s for s, _ in b["train_log"]] == [s for s, _ in a["train_log"]] == [2, 4, 6, 8]
    torch.testing.assert_close([v for _, v in b["train_log"]], [v for _, v in a["train_log"]], atol=1e-6, rtol=0)
    assert [h["step"] for h in a["history"]] == [4, 8]
    assert [(h["step"], h["wer"]) for h in b["history"]] == [(h["step"], h["wer"]) for h in a["history"]]
    assert_same_weights(weights(ref), weights(out))
    # TensorBoard: one curve, each step once, the same values as the uninterrupted run.
    for tag in ("train/loss", "eval/wer"):
        got, want = scalars(out, tag), scalars(ref, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        torch.testing.assert_close([v for _, v in got], [v for _, v in want], atol=1e-5, rtol=0)


def test_resume_restores_a_folder_a_crash_left_half_replaced(tmp_path):
    # A crash between the two renames of write_atomically: best/ is gone, best.old-PID is whole.
    (tmp_path / "best.old-123").mkdir()
    (tmp_path / "best.old-123" / "model.safetensors").write_text("weights")
    (tmp_path / "best.tmp-123").mkdir()
    (tmp_path / "metrics.jsonl.tmp-9").write_text("{")
    (tmp_path / "checkpoint-5").mkdir()  # someone's folder, no training_state.pt: named, left alone
    report = checkpoint.tidy_interrupted_writes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoint-5"]
    assert (tmp_path / "best" / "model.safetensors").read_text() == "weights"
    assert report == ["restored best from best.old-123 (a crash interrupted its replacement)",
                      "removed best.tmp-123: an interrupted write",
                      "ignored checkpoint-5: no training_state.pt, not a complete checkpoint",
                      "removed metrics.jsonl.tmp-9: an interrupted write"]


def cut_in_half(path):
    os.truncate(path, os.path.getsize(path) // 2)


def flip_middle_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


# What a copy that stopped, a full disk or a bad block leaves: (file, damage, the reason named)
DAMAGE = {"weights cut short": ("model.safetensors", cut_in_half, "cut short"),
          "empty config": ("config.json", lambda path: open(path, "w").close(), "empty"),
          "state cut short": (checkpoint.STATE_FILE, cut_in_half, "cut short or damaged: not a whole torch.save"),
          "state bit flipped": (checkpoint.STATE_FILE, flip_middle_byte, "does not match its checksum")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_file_is_named(trained_run, tmp_path, damage):
    name, spoil, reason = DAMAGE[damage]
    folder = tmp_path / "checkpoint-500"
    shutil.copytree(os.path.join(trained_run, "checkpoint-500"), folder)
    assert checkpoint.damaged_file(str(folder), training_state=True) is None
    spoil(folder / name)
    problem = checkpoint.damaged_file(str(folder), training_state=True)
    assert problem.startswith(f"{folder / name}: ") and reason in problem, problem
    # As a model folder (infer.py, metrics.py --model) the training state is not its business.
    assert (checkpoint.damaged_file(str(folder)) is None) == (name == checkpoint.STATE_FILE)


def test_resume_skips_a_damaged_newest_checkpoint_and_names_a_damaged_one_given(trained_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out, ignore=shutil.ignore_patterns("best"))
    cut_in_half(out / "checkpoint-500" / "model.safetensors")
    args = [*TRAINED_RUN, "--output-dir", str(out), "--max-steps", "251", "--num-examples", "0"]
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--resume", str(out / "checkpoint-500")])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --resume: {out / 'checkpoint-500' / 'model.safetensors'}: ")
    assert err[0].endswith(": cut short; the checkpoint cannot be resumed from"), err
    train.main([*args, "--resume"])
    said = capsys.readouterr().out
    assert f"--resume: skipping checkpoint-500, it is damaged ({out / 'checkpoint-500' / 'model.safetensors'}: " in said
    assert f"resumed from {out / 'checkpoint-250'} at step 250" in said
    assert os.path.isfile(out / "checkpoint-251" / checkpoint.STATE_FILE)


def test_a_damaged_model_folder_is_one_line_in_infer_and_metrics(trained_run, tmp_path, capsys):
    best = tmp_path / "best"
    shutil.copytree(os.path.join(trained_run, "best"), best)
    cut_in_half(best / "model.safetensors")
    expected = f"error: {best / 'model.safetensors'}: "
    for main, argv in ((infer.main, ["--model", str(best), os.path.join(ROOT, "README.md")]),
                       (metrics.main, ["--model", str(best)])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(expected) and err[0].endswith("cut short; the model folder cannot be loaded"), err


def test_rotation_keeps_the_checkpoint_the_run_resumed_from(tmp_path, tiny_model_dir):
    # Evaluated at the end of each run only, and the loss falls: the best moves from 3 to 8, so
    # checkpoint-3 survives the limit of 1 for being the one resumed from, not for being the best.
    args = [*RUN, "--model", tiny_model_dir, "--save-total-limit", "1", "--eval-steps", "100",
            "--metric-for-best", "eval_loss"]
    train.main([*args, "--output-dir", str(tmp_path), "--max-steps", "3"])
    train.main([*args, "--output-dir", str(tmp_path), "--resume"])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-8"]
    assert final_state(tmp_path)["best"]["step"] == 8


def test_a_failed_write_of_best_or_metrics_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    with pytest.raises(SystemExit) as e:
        train.main([*RUN, "--model", tiny_model_dir, "--output-dir", str(tmp_path), "--eval-steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: could not write {tmp_path / 'best'} (No space left on device); training stopped, "
                   f"the checkpoints written before are intact"]


def test_remote_code_runs_only_with_trust_remote_code(tmp_path, tiny_model_dir, capsys):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="git-custom", auto_map={"AutoConfig": "custom.Config",
                                                     "AutoModelForCausalLM": "custom.Model"})
    (remote / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (remote / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import GitConfig, GitForCausalLM\n"
        "class Config(GitConfig):\n    model_type = 'git-custom'\n"
        "class Model(GitForCausalLM):\n    config_class = Config\n")
    with pytest.raises(SystemExit) as e:
        train.main([*RUN, "--model", str(remote), "--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comes with its own Python code; pass --trust-remote-code" in err[0]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, no_dropout_model):
    ranks = train_cli(tmp_path / "ddp", no_dropout_model, "--batch-size", "4", torchrun=2)
    assert ranks.returncode == 0, ranks.stderr
    one = train_cli(tmp_path / "one", no_dropout_model, "--batch-size", "8", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    assert "2 processes, global batch 16" in ranks.stdout
    assert ranks.stdout.count("saved ") == one.stdout.count("saved ") == 3  # rank 0 alone logs and saves
    a, b = final_state(tmp_path / "ddp"), final_state(tmp_path / "one")
    assert a["step"] == b["step"] == 8
    torch.testing.assert_close([v for _, v in a["train_log"]], [v for _, v in b["train_log"]], atol=1e-5, rtol=0)
    assert_same_weights(weights(tmp_path / "ddp"), weights(tmp_path / "one"), atol=1e-5)
    # Evaluation: 9 images over 2 ranks (5 + 4), gathered, each scored once: the same scores.
    assert [x["step"] for x in a["history"]] == [y["step"] for y in b["history"]] == [4, 8]
    for x, y in zip(a["history"], b["history"]):
        assert x["step"] == y["step"] and x["wer"] == y["wer"] and x["cider_d"] == pytest.approx(y["cider_d"])
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=1e-5)


# --objective scst from the session's trained model (a random one's samples earn no reward, so
# their advantages, and the steps, would all be zero).
SCST = ["--objective", "scst", "--scst-samples", "3", "--scst-max-length", "20", "--learning-rate", "1e-4"]


def without_dropout(model_dir, out):
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


@pytest.fixture(scope="module")
def scst_run(trained_run, tmp_path_factory):
    """(the model it starts from, its output folder): an uninterrupted --objective scst run in one
    process, from the session's trained model without dropout, one thread (as each torchrun rank)."""
    out = tmp_path_factory.mktemp("scst")
    start = without_dropout(os.path.join(trained_run, "best"), out / "model")
    proc = train_cli(out / "one", start, *SCST, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    return start, out / "one"


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_scst_killed_then_resumed_equals_an_uninterrupted_run(scst_run, tmp_path):
    start, ref = scst_run
    out = tmp_path / "run"
    # Killed in step 5's first loss pass: the resume starts from checkpoint-3, whose logging window
    # (step 3's rewards) the line at step 4 must average in.
    killed = train_cli(out, start, *SCST, crash=("accumulation", "9"), env=ONE_THREAD)
    assert killed.returncode == -9, killed.stderr
    resumed = train_cli(out, start, *SCST, "--resume", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoint-3'} at step 3" in resumed.stdout
    a, b = final_state(ref), final_state(out)
    torch.testing.assert_close([v for _, v in b["train_log"]], [v for _, v in a["train_log"]], atol=1e-6, rtol=0)
    assert_same_weights(weights(ref), weights(out))
    assert [(h["step"], h["cider_d"]) for h in b["history"]] == [(h["step"], h["cider_d"]) for h in a["history"]]
    # The samples after the resume are the ones the uninterrupted run drew: the same rewards, logged once.
    for tag in ("train/scst_reward", "train/scst_distinct_samples", "train/scst_sample_length"):
        got, want = scalars(out, tag), scalars(ref, tag)
        assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6, 8], tag
        torch.testing.assert_close([v for _, v in got], [v for _, v in want], atol=1e-6, rtol=0)
    assert len({v for _, v in scalars(out, "train/scst_reward")}) > 1


@pytest.mark.slow
def test_scst_under_torchrun_two_ranks_equal_one_process_with_twice_the_batch(scst_run, tmp_path):
    start, one = scst_run  # its --batch-size 8 on one rank; here 4 on each of 2
    ranks = train_cli(tmp_path / "ddp", start, *SCST, "--batch-size", "4", torchrun=2)
    assert ranks.returncode == 0, ranks.stderr
    # Each rank samples and rewards its own images, from each image's own stream: the same samples,
    # rewards and steps as one process that holds all of them.
    for tag in ("train/scst_reward", "train/scst_advantage_spread", "train/scst_sample_length"):
        got, want = scalars(tmp_path / "ddp", tag), scalars(one, tag)
        assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6, 8], tag
        torch.testing.assert_close([v for _, v in got], [v for _, v in want], atol=1e-5, rtol=0)
    a, b = final_state(tmp_path / "ddp"), final_state(one)
    torch.testing.assert_close([v for _, v in a["train_log"]], [v for _, v in b["train_log"]], atol=1e-5, rtol=0)
    assert_same_weights(weights(tmp_path / "ddp"), weights(one), atol=1e-5)
    moved = max(float((weights(one)[k] - v).abs().max())
                for k, v in load_file(os.path.join(start, "model.safetensors")).items())
    assert moved > 1e-4  # the steps did something for the two runs to agree on


@pytest.mark.slow
def test_torchrun_resumes_every_rank_from_the_same_checkpoint(tmp_path, tiny_model_dir):
    full = train_cli(tmp_path / "full", tiny_model_dir, "--batch-size", "4", torchrun=2)
    assert full.returncode == 0, full.stderr
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train_cli(tmp_path / "resumed", tiny_model_dir, "--batch-size", "4", "--resume", torchrun=2)
    assert resumed.returncode == 0, resumed.stderr
    assert len(final_state(tmp_path / "full")["rng"]) == 2  # each rank's own streams (dropout) are kept
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "resumed"))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "train.py"), *RUN, "--model", tiny_model_dir, "--output-dir", str(out),
           "--max-steps", "100000", "--logging-steps", "1", "--eval-steps", "100000", "--save-steps", "100000"]
    with Child(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}) as child:
        child.stdout.read(timeout=300, until=lambda line: line.startswith("step 3/"))  # training is under way
        child.proc.terminate()  # torchrun passes SIGTERM on to both ranks
        rest = "".join(child.stdout.read(timeout=300))
        child.proc.wait(timeout=60)
    # torchrun itself then exits non-zero with its own report of the signal; the ranks saved first.
    stopped = [line for line in rest.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1 and "--resume" in stopped[0], rest
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert len(final_state(out, step)["rng"]) == 2  # both ranks reached the save together


def worker_pid(torchrun_pid, rank):
    """The process of one torchrun rank: the child of torchrun whose environment holds RANK=rank (Linux /proc)."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue  # ended while we looked, or not ours to read
        if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"torchrun (process {torchrun_pid}) has no child with RANK={rank}")


@pytest.mark.slow
def test_torchrun_a_rank_killed_leaves_one_line_naming_it_on_the_other(tmp_path, tiny_model_dir):
    out, logs = tmp_path / "run", tmp_path / "logs"
    # --redirects 2: each rank's stderr goes to its own file, apart from torchrun's report (which
    # has a traceback of its own).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--redirects", "2",
           "--log-dir", str(logs), os.path.join(ROOT, "train.py"), *RUN, "--model", tiny_model_dir,
           "--output-dir", str(out), "--max-steps", "40", "--logging-steps", "1", "--save-steps", "2",
           "--eval-steps", "1000"]
    with Child(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}) as child:
        child.stdout.read(timeout=300, until=lambda line: line.startswith("step 3/"))  # checkpoint-2 is written
        victim = worker_pid(child.proc.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        child.stdout.read(timeout=120)  # torchrun ends when rank 0 has
        assert child.proc.wait(timeout=60) != 0
    [survivor] = logs.glob("*/attempt_0/0/stderr.log")
    err = survivor.read_text()
    assert "Traceback" not in err, err
    m = re.fullmatch(rf"error: rank 1 \(process {victim} on this machine\) is gone; the checkpoints written before are "
                     rf"intact \(the newest is ({re.escape(str(out))}/checkpoint-\d+)\): run the same torchrun command "
                     rf"with --resume\n", err)
    assert m, err
    assert os.path.isfile(os.path.join(m[1], checkpoint.STATE_FILE))


def test_fp16_resume_restores_the_grad_scaler(tmp_path, tiny_model_dir):
    # Micro-batches of 2: a float16 backward pass on a CPU without float16 units costs some 15 times a float32 one.
    args = [*RUN, "--model", tiny_model_dir, "--precision", "fp16", "--eval-steps", "100", "--batch-size", "2",
            "--gen-max-length", "10"]
    train.main([*args, "--output-dir", str(tmp_path / "full")])
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    train.main([*args, "--output-dir", str(tmp_path / "resumed"), "--resume"])
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "resumed")
    assert a["scaler"]["scale"] == b["scaler"]["scale"] and a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "resumed"))
