"""What the command lines share: a parser whose errors are one line, `fail`, `say`, and argparse
types that check a number's range. A leaf (no torch: the device and precision are in runtime.py),
so that `--help` and flag errors answer at once.
"""
import argparse
import os
import sys

from tqdm.auto import tqdm


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTIONS = ("auto", "sdpa", "eager")
# --max-image-pixels' default (decode.py says why); here, so that --help answers without importing PIL.
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
share = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def comma_list(choices):
    """An argparse type: a comma-separated list of some of `choices`, at least one."""
    def parse(text):
        items = [x for x in text.split(",") if x]
        unknown = [x for x in items if x not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}, not {text!r}")
        return items
    return parse


def usable_cores(cap=8):
    """The cores this process may run on (a container's or taskset's share), at most cap."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, cap))


