"""What a run computes on: the device, the autocast precision, GIT's attention, and the time spent compiling.
"""
import torch
from torch._dynamo.utils import calculate_time_spent


def cpu_has_bf16_units():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(name):
    """torch.device for --device auto|cpu|cuda; ValueError when CUDA is asked for and missing."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def pick_precision(name, device):
    """(autocast dtype or None, whether to use a GradScaler) for --precision on `device`:
    auto is fp16 + GradScaler on CUDA, bf16 on CPUs with bf16 matrix units, else fp32."""
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "bf16" if cpu_has_bf16_units() else "fp32"
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name], name == "fp16"


def pick_attention(name, device):
    """'sdpa' or 'eager' for --attention on `device`. On a CPU a git-base-sized training step
    measured slower with torch's fused attention than with eager, in bf16 and in fp32 (README)."""
    if name != "auto":
        return name
    return "sdpa" if device.type == "cuda" else "eager"


def autocast(device, amp_dtype):
    """The autocast context for a precision choice (a no-op one for fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def compile_seconds():
    """Wall time torch.compile has spent compiling in this process so far."""
    return calculate_time_spent().get("total_wall_time", 0.0)
