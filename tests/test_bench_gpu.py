"""bench/gpu.py: its FLOP count agrees with a count done by hand, and the peak table knows the GPUs
by their names. Its quick run on the CPU is tested in test_check_gpu.py, as part of make check-gpu's."""
import importlib.util
import os

import pytest
from transformers import GitConfig

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu.py")


def load_gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = load_gpu_module()


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
