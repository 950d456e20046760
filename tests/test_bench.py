"""bench/bench.py --quick: the programs train the same tiny model on the same images and
the report holds a speed and a peak memory for each (no timing thresholds: this machine is shared)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_bench_reports_speed_and_memory_of_the_recipe_and_ours(tmp_path):
    out = tmp_path / "results.json"
    # The guide's recipe and ours; trainer-dynamic is the recipe's script with --padding longest (make bench
    # runs all three): each program is a process of its own, and its start alone costs ~13 s here.
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench.py"), "--quick", "--out", str(out),
                          "--work-dir", str(tmp_path / "work"), "--programs", "recipe,ours"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    programs = report["train"]["small"]["programs"]
    assert set(programs) == {"recipe", "ours"}
    for name, result in programs.items():
        assert result["steps_recorded"] == result["max_steps"] == 4, name  # one stamp per optimizer step
        assert result["timed_steps"] == 3, name
        assert result["seconds_per_step"] > 0 and result["samples_per_second"] > 0, name
        assert result["peak_rss_mib"] > 0 and result["ours_speedup"] > 0, name
    assert 0 <= programs["ours"]["data_wait_share"] <= 1
    assert report["machine"]["cores"] > 0 and report["command"].endswith(f"--work-dir {tmp_path / 'work'} --programs recipe,ours")
    assert "ours is x faster" in run.stdout
    # the work folder holds no program outputs afterwards, only logs, data, models and caches
    assert not [p for p in os.listdir(tmp_path / "work" / "runs") if not p.endswith(".timing.json")]


@pytest.mark.slow
def test_quick_options_bench_trains_the_same_caption_rows_per_step(tmp_path):
    out = tmp_path / "options.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "options.py"), "--quick", "--configs", "one,all",
                          "--out", str(out), "--work-dir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"one", "all"}
    assert (results["one"]["images_per_step"], results["all"]["images_per_step"]) == (20, 4)
    for name, result in results.items():
        assert result["captions_per_step"] == 20 and result["steps_recorded"] == 3, name
        assert result["captions_per_second"] > 0 and result["peak_rss_mib_at_last_step"] > 0, name
        # train.py's own figure, from its final speed line: images/s, five times fewer with `all`
        assert result["train_py_images_per_second"] > 0, name
    assert "all (4 images x 5)" in run.stdout


def test_trainer_dynamic_is_the_recipe_with_each_batch_padded_to_its_longest_caption(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """The third program of make bench, which the quick bench above leaves out (a program start costs
    ~13 s): trainer_recipe.py with --padding longest trains its steps on batches padded per batch."""
    import transformers
    from torch.optim.optimizer import register_optimizer_step_post_hook

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import bench

    widths, steps = [], []
    forward = transformers.GitForCausalLM.forward
    monkeypatch.setattr(transformers.GitForCausalLM, "forward",
                        lambda self, *a, **k: widths.append(k["input_ids"].shape[1]) or forward(self, *a, **k))
    hook = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    try:
        # bench.py's flags for the program, on the tiny model and a few synthetic scenes
        run = in_process("trainer_recipe", "--dataset", "synthetic", "--synthetic-size", "24", "--model", tiny_model_dir,
                         "--output-dir", tmp_path / "out", "--batch-size", "4", "--max-steps", "4", "--precision", "fp32",
                         "--eval-steps", "5", "--save-steps", "5", "--logging-steps", "4",
                         *bench.PROGRAMS["trainer-dynamic"][1], env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    finally:
        hook.remove()
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(steps) == 4 and "train_samples_per_second" in run.stdout
    model_max_length = transformers.AutoTokenizer.from_pretrained(tiny_model_dir).model_max_length
    assert widths and max(widths) < model_max_length and len(set(widths)) > 1, (widths, model_max_length)
