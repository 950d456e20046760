"""bench/gpu.py: the quick run on the CPU reports every variant and precision with real numbers,
its FLOP count agrees with a count done by hand, and the peak table knows the GPUs by their names.
No timing thresholds: this machine is shared."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from transformers import GitConfig

from conftest import ROOT
from captioning import runtime

SCRIPT = os.path.join(ROOT, "bench", "gpu.py")


def load_gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = load_gpu_module()


def run_quick(tmp_path, *flags):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--work-dir", str(tmp_path / "work"),
                          "--json", str(out), *flags], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_training_row(row, flops_per_step, batch_size):
    assert positive(row["images_per_second"]) and positive(row["seconds_per_step"]), row
    assert positive(row["peak_memory_mib"]), row
    assert row["images_per_second"] == pytest.approx(batch_size / row["seconds_per_step"])
    assert row["achieved_tflops"] == pytest.approx(flops_per_step / row["seconds_per_step"] / 1e12)
    assert 0 < row["mfu"] <= 1, row
    assert math.isfinite(row["last_loss"]), row


def test_quick_run_measures_every_variant_precision_and_generate(tmp_path):
    report, stdout = run_quick(tmp_path, "--variants", "eager,sdpa")
    assert report["device"] == "cpu" and report["model"]["preset"] == "tiny"
    fastest = "bfloat16" if runtime.cpu_has_bf16_units() else "float32"  # a CPU's fastest matrix path
    assert report["peak"]["source"].startswith(f"measured: torch.mm {fastest}")  # a CPU is never in the table
    # The FLOPs in the report are train_step_flops of the model that was built, on the batch used.
    model = report["model"]
    config = GitConfig.from_pretrained(tmp_path / "work" / "gpu-model-tiny")
    assert model["image_tokens"] == 65 and model["parameters"] > 0
    assert report["train_flops_per_step"] == gpu.train_step_flops(
        config, report["batch_size"], report["batch_size"], model["caption_length"], model["predicted_tokens"])

    assert set(report["train"]) == {"eager", "sdpa"}
    for variant, by_precision in report["train"].items():
        assert set(by_precision) == {"fp16", "bf16"}, variant
        for row in by_precision.values():
            check_training_row(row, report["train_flops_per_step"], report["batch_size"])
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


# The sdpa+compile rows go through run.wrap_for_training and train.optimizer_step with --compile,
# which tests/test_compile.py trains with; compiling here too would add most of a minute to the suite.


def test_train_step_flops_matches_a_count_by_hand():
    # A 4 x 4 image in 2 x 2 patches: 4 patches + the class token = 5 image tokens.
    config = GitConfig(vision_config=dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=1, image_size=4, patch_size=2),
                       hidden_size=6, intermediate_size=12, num_hidden_layers=1, num_attention_heads=1,
                       vocab_size=10)
    # Multiply-adds of the forward pass, 2 images, 2 caption rows of 3 tokens, 4 predicted tokens:
    patches = 3 * 2 * 2 * 4 * 4 * 2           # 48 weights x 4 patches x 2 images = 384
    vit = (4 * 4 * 4 + 2 * 4 * 8) * 5 * 2     # 128 weights x 5 tokens x 2 images = 1280
    projection = 4 * 6 * 5 * 2                # 24 weights x 5 tokens x 2 images = 240
    decoder = (4 * 6 * 6 + 2 * 6 * 12) * 8 * 2  # 288 weights x (5 + 3) tokens x 2 rows = 4608
    output = 6 * 10 * 4                       # 60 weights x 4 predicted tokens = 240
    # Attention FLOPs, Q K^T and scores x V: 4 n^2 d a layer and sequence.
    attention = 4 * 5 ** 2 * 4 * 2 + 4 * 8 ** 2 * 6 * 2  # 800 (ViT) + 3072 (decoder)
    forward = 2 * (patches + vit + projection + decoder + output) + attention
    assert forward == 17376
    assert gpu.train_step_flops(config, images=2, caption_rows=2, caption_length=3, predicted_tokens=4) == 3 * forward


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", None),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05), ("NVIDIA A10", 125.0), ("NVIDIA A10G", None),
    ("Tesla T4", 65.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table_matches_cuda_device_names(name, tflops):
    found = gpu.table_peak(name)
    assert (found[0] if found else None) == tflops
