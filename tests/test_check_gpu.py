"""make check-gpu's quick mode on this CPU: every check runs and passes, bench/gpu.py's table inside
it has real numbers, the JSON holds the fields the README lists, and one failing check is recorded
without stopping the others. No timing thresholds: this machine is shared."""
import json
import math
import os
import re

import pytest
from transformers import GitConfig

from captioning import runtime
from conftest import ROOT, in_process

CHECKS = {
    "correctness": ["sdpa vs eager, fp32", "sdpa vs eager, fp16", "sdpa vs eager, bf16", "generate", "compile"],
    "program": ["train", "kill -9, resume", "infer.py", "metrics.py --model"],
    "speed": ["bench/gpu.py", "infer.py over photos"],
}


@pytest.fixture(scope="module")
def bench_path():
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(os.path.join(ROOT, "bench"))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def quick(tmp_path_factory, bench_path):
    """One `bench/check_gpu.py --quick --device cpu` run (about 90 s alone here): (report, stdout, work folder)."""
    work = tmp_path_factory.mktemp("check-gpu")
    run = in_process("check_gpu", "--quick", "--device", "cpu", "--work-dir", work, "--json", work / "check.json",
                     cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((work / "check.json").read_text()), run.stdout, work


@pytest.mark.slow
def test_every_check_runs_and_passes_and_the_table_says_so(quick):
    report, stdout, _ = quick
    assert report["quick"] and report["device"] == "cpu" and report["failed"] == []
    for part, names in CHECKS.items():
        assert list(k for k in report[part] if isinstance(report[part][k], dict)) == names, part
        for name in names:
            assert report[part][name]["status"] == "passed", (part, name, report[part][name])
            assert re.search(rf"^{part} +{re.escape(name)} +passed ", stdout, re.M), (part, name)
    assert "all checks passed" in stdout


@pytest.mark.slow
def test_the_numbers_behind_the_checks(quick):
    report, _, _ = quick
    c, p = report["correctness"], report["program"]
    assert c["sdpa vs eager, fp32"]["sdpa_vs_eager"]["grads_compared"] > 90  # every parameter of the tiny GIT
    for precision in ("fp16", "bf16"):  # both rounded: the rule compares errors that are not zero
        r = c[f"sdpa vs eager, {precision}"]
        assert 0 < r["eager_vs_fp32"]["logits"] and 0 < r["sdpa_vs_fp32"]["logits"] <= r["bound"]["logits"]
    assert c["generate"]["greedy"]["fp32_identical"] and c["generate"]["beam3"]["fp32_identical"]
    assert 0 <= c["generate"]["greedy"]["fp16_share_sdpa_equal_to_eager"] <= 1
    assert c["compile"]["backend"] == "aot_eager" and c["compile"]["difference"] <= 1e-5
    # on the CPU the resumed run is bit-exact; the kill came after the first checkpoint and before the end
    assert p["kill -9, resume"]["bit_exact"] and p["kill -9, resume"]["killed_after"] == "checkpoint-2"
    assert p["train"]["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert p["metrics.py --model"]["wer"] == p["train"]["best"]["value"]
    assert len(p["infer.py"]["captions"]) == 4
    photos = report["speed"]["infer.py over photos"]
    assert photos["images"] == 12 and photos["images_per_second"] > 0 and photos["first_output_seconds"] > 0


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_gpu_py_measures_every_variant_precision_and_generate(quick):
    """bench/gpu.py's quick run, as check-gpu runs it. Its sdpa+compile rows go through training's
    wrap_for_training and train.optimizer_step with --compile, which test_compile.py trains with;
    compiling here too would add most of a minute to the suite."""
    import gpu

    whole, stdout, work = quick
    report = whole["speed"]["bench/gpu.py"]["report"]
    assert report["device"] == "cpu" and report["model"]["preset"] == "tiny"
    fastest = "bfloat16" if runtime.cpu_has_bf16_units() else "float32"  # a CPU's fastest matrix path
    assert report["peak"]["source"].startswith(f"measured: torch.mm {fastest}")  # a CPU is never in the table
    # The FLOPs in the report are train_step_flops of the model that was built, on the batch used.
    model = report["model"]
    config = GitConfig.from_pretrained(work / "gpu-model-tiny")
    assert model["image_tokens"] == 65 and model["parameters"] > 0
    assert report["train_flops_per_step"] == gpu.train_step_flops(
        config, report["batch_size"], report["batch_size"], model["caption_length"], model["predicted_tokens"])

    assert set(report["train"]) == {"eager", "sdpa"}
    for variant, by_precision in report["train"].items():
        assert set(by_precision) == {"fp16", "bf16"}, variant
        for row in by_precision.values():
            assert positive(row["images_per_second"]) and positive(row["seconds_per_step"]), row
            assert positive(row["peak_memory_mib"]), row
            assert row["images_per_second"] == pytest.approx(report["batch_size"] / row["seconds_per_step"])
            assert row["achieved_tflops"] == pytest.approx(report["train_flops_per_step"] / row["seconds_per_step"] / 1e12)
            assert 0 < row["mfu"] <= 1 and math.isfinite(row["last_loss"]), row
            assert len(row["warmup_seconds"]) == report["warmup"] == 2 and "compile_seconds" not in row
        assert by_precision["fp16"]["scale"] > 0  # fp16 trained through a GradScaler
        assert by_precision["bf16"]["scale"] is None  # bf16 needs none

    settings = report["generate_settings"]
    assert (settings["batch_size"], settings["max_length"], settings["precision"]) == (8, 8, fastest)  # --precision auto
    assert set(report["generate"]) == {"eager", "sdpa"}
    for row in report["generate"].values():
        assert positive(row["images_per_second"]) and positive(row["peak_memory_mib"]), row
        assert row["caption_tokens"] == 8  # every caption written to max_length: the same work for both

    assert f"torch {report['torch']}" in stdout and "peak for MFU:" in stdout
    assert "fp16 + GradScaler" in stdout and "peak RSS MiB" in stdout and "generate: batch 8" in stdout


@pytest.mark.slow
def test_the_readme_lists_the_json_fields(quick):
    report, _, _ = quick
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("<!-- check-gpu fields -->")[1].split("\n\n")[0]
    listed = {name for line in section.splitlines() if line.startswith("- ")
              for name in re.findall(r"`([a-z_]+)`", line.split(": ")[0])}
    assert listed == set(report), sorted(set(report) ^ listed)


def test_a_check_that_fails_or_raises_is_recorded_and_the_others_still_run(tmp_path, bench_path, monkeypatch):
    import check_gpu

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(check_gpu, "check_attention_numbers", lambda *a: {"status": "passed", "sdpa_vs_eager": {
        "loss": 0, "logits": 0, "grad": 0}, "tolerance": {}})
    monkeypatch.setattr(check_gpu, "check_generate", broken)
    monkeypatch.setattr(check_gpu, "check_compile", lambda *a: {"status": "failed", "failed": ["loss"], "backend": "x",
                                                                "loss": 1.0, "compiled_loss": 2.0})
    run = in_process("check_gpu", "--quick", "--device", "cpu", "--parts", "correctness", "--work-dir", tmp_path,
                     "--json", tmp_path / "check.json")
    assert run.returncode == 1
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["failed"] == ["correctness: generate", "correctness: compile"]
    assert report["correctness"]["generate"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert report["correctness"]["compile"]["loss"] == 1.0  # the check after the error ran
    assert re.search(r"^correctness +generate +error +RuntimeError: CUDA error", run.stdout, re.M)
    assert "FAILED: correctness: generate; correctness: compile" in run.stdout
    assert "program" not in report and "speed" not in report  # --parts
