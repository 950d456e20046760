"""What the command lines share: a parser whose errors are one line, `fail`, argparse types that
check a number's range, and the choice of device and precision used by training and captioning.

Kept free of heavy imports (torch is imported inside the functions that need it), so `--help`
and flag errors answer at once.
"""
import argparse
import os
import sys

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTIONS = ("auto", "sdpa", "eager")
# --max-image-pixels' default (data.py says why); here, so that --help answers without importing PIL.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_PIXELS_HELP = ("refuse an image that would decode to more pixels than this, as a bad row (a JPEG counts "
                         "at the reduced size it is decoded at); 0: no limit")
ATTENTION_HELP = ("sdpa: GIT's attention through torch's fused scaled_dot_product_attention (same weights, same "
                  "results); eager: transformers' own; auto: sdpa on CUDA, eager on a CPU, where it measured "
                  "faster (README: Attention and compiling)")


def first_rank():
    """True but in torchrun's ranks 1, 2...: every rank meets the same bad flag or data, and one says so."""
    return os.environ.get("RANK", "0") == "0"


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line (not usage + error), said once under torchrun."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if first_rank() else None)


def fail(message, status=2):
    """Stop the program with one line on stderr (from rank 0 only under torchrun)."""
    if first_rank():
        print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def say(message):
    """A line for the user from rank 0, printed past a progress bar and flushed, so that a log
    file or a pipe sees each line when it happens."""
    if first_rank():
        from tqdm.auto import tqdm

        tqdm.write(message)
        sys.stdout.flush()


def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "positive")
positive_float = _number(float, lambda v: v > 0, "positive")
non_negative_int = _number(int, lambda v: v >= 0, "non-negative")
non_negative_float = _number(float, lambda v: v >= 0, "non-negative")
fraction = _number(float, lambda v: 0 < v < 1, "between 0 and 1")
probability = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def usable_cores(cap=8):
    """The cores this process may run on (a container's or taskset's share), at most cap."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, cap))


def cpu_has_bf16_units():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(name):
    """torch.device for --device auto|cpu|cuda; ValueError when CUDA is asked for and missing."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def pick_precision(name, device):
    """(autocast dtype or None, whether to use a GradScaler) for --precision on `device`:
    auto is fp16 + GradScaler on CUDA, bf16 on CPUs with bf16 matrix units, else fp32."""
    import torch

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
    import torch

    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
