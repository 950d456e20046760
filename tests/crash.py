"""Run train.py and kill this process with SIGKILL at a chosen point, as a crash would.

    python tests/crash.py accumulation N -- TRAIN ARGS   # in the Nth training forward pass
    python tests/crash.py evaluation N -- TRAIN ARGS     # in the Nth evaluation batch
    python tests/crash.py checkpoint N -- TRAIN ARGS     # half-way through writing the Nth training_state.pt

SIGKILL cannot be caught: no signal handler, `finally` or atexit runs, exactly like a machine
taken away. The points are counted in the program's own calls, so a test lands on the same
instruction every time, with no sleeps or timing.
"""
import io
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from captioning import checkpoint, evaluation  # noqa: E402
import train  # noqa: E402


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, n, sep, *train_args = sys.argv[1:]
    assert sep == "--" and point in ("accumulation", "evaluation", "checkpoint"), sys.argv
    n, calls = int(n), {"train": 0, "eval": 0, "save": 0}
    caption_loss, torch_save = evaluation.caption_loss, checkpoint.torch.save

    def counted_loss(model, batch, num_tokens, **kwargs):
        kind = "train" if model.training else "eval"
        calls[kind] += 1
        if (point, kind) in (("accumulation", "train"), ("evaluation", "eval")) and calls[kind] == n:
            die()
        return caption_loss(model, batch, num_tokens, **kwargs)

    def half_written_save(obj, path, *args, **kwargs):
        calls["save"] += 1
        if point == "checkpoint" and calls["save"] == n:
            buffer = io.BytesIO()
            torch_save(obj, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        return torch_save(obj, path, *args, **kwargs)

    evaluation.caption_loss = counted_loss
    checkpoint.torch.save = half_written_save
    train.main(train_args)


if __name__ == "__main__":
    main()
