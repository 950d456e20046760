"""Checkpoints that any Hugging Face user can load, and that resume a run exactly.

    OUT/checkpoint-STEP/   model + processor (save_pretrained, safetensors),
                           training_state.pt (optimizer, scheduler, scaler, RNG, position in the data),
                           trainer_state.json (step, epoch, metrics: for people, not for resume)
    OUT/best/              model + processor of the best evaluation so far, training_args.json (the run's flags)

Every folder is written under a temporary name and renamed into place when complete, so a crash
mid-write never leaves a folder that looks finished. training_state.pt holds only tensors and plain
Python values and loads with torch.load(weights_only=True); save_checkpoint writes it and restore
reads it back, here, so that what is saved and what a resume expects cannot drift apart.
"""
import dataclasses
import errno
import fcntl
import json
import os
import random
import re
import shutil
import socket
import struct
import zipfile

import numpy as np
import torch

from captioning import workers
from captioning.cli import say


STATE_FILE = "training_state.pt"
LOCK_FILE = ".lock"  # held by the run that owns the folder; its text names that process
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^(.+)\.(tmp|old)-\d+$")  # the temporary names write_atomically uses


class FolderBusy(Exception):
    """Another live process holds the folder's lock; the message names it."""


def lock_folder(folder):
    """Take the exclusive OS lock on folder/.lock, or raise FolderBusy naming its holder.

    The lock belongs to the open file: the OS drops it when the process ends, however it ends
    (kill -9 included), so no stale lock can block a later run. Keep the returned file open for as
    long as the folder is yours; release_folder(f) lets it go. The file itself is never removed:
    a process could be holding the lock on a file that was unlinked while another creates a new one."""
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, LOCK_FILE), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FolderBusy(holder) from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return workers.hold(f)  # a worker forked while the run holds the folder must not keep it held


def release_folder(f):
    workers.let_go(f)
    f.close()


def write_atomically(final_dir, write):
    """Call write(tmp_dir), then rename tmp_dir to final_dir (replacing an older one).

    A full disk surfaces as whatever the writer raises (torch.save: RuntimeError "unexpected pos",
    which names no cause, so the free space tells; safetensors: SafetensorError with the OS's text;
    plain files: OSError); it is raised here as OSError(ENOSPC), after the half-written folder is
    removed."""
    tmp = f"{final_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
    except BaseException as e:
        full = isinstance(e, Exception) and (os.strerror(errno.ENOSPC) in str(e) or disk_full(tmp))
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder must not fill the disk further
        if full and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), final_dir) from e
        raise
    if os.path.exists(final_dir):
        old = f"{final_dir}.old-{os.getpid()}"
        os.rename(final_dir, old)
        os.rename(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final_dir)


def disk_full(path, margin=1 << 20):
    """Less than margin bytes left for us on path's filesystem (statvfs's f_bavail)."""
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False


def write_model_files(d, model, processor, card=None, args_json=None):
    """What any model folder holds (best/, each checkpoint): weights, processor, model card, and the
    run's flags (args_json), which let metrics.py score it as the run did."""
    model.save_pretrained(d)
    processor.save_pretrained(d)
    write_card(d, card)
    if args_json is not None:
        with open(os.path.join(d, "training_args.json"), "w") as f:
            f.write(args_json)


def save_model(out_dir, model, processor, card=None, args_json=None):
    """A model folder (best/), written atomically."""
    write_atomically(out_dir, lambda d: write_model_files(d, model, processor, card, args_json))


def write_card(folder, card):
    if card is not None:
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(card)


def write_file_atomically(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# The training state: what save_checkpoint writes to training_state.pt, and restore reads back

def empty_window():
    # sampling: --objective scst's sums of scst.STATS over the window's steps
    return {"loss": 0.0, "steps": 0, "samples": 0, "captions": 0, "sampling": []}


@dataclasses.dataclass
class TrainState:
    """The progress a resume needs, besides the weights, optimizer, scheduler, scaler and RNG
    streams. Saved by state_dict() and restored by from_state_dict() alone, so that what is saved
    and what is resumed cannot drift apart."""
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    # Samples of this epoch taken, all ranks together: in samples, not batches, so that a run
    # resumed with another number of ranks continues with exactly the samples not yet seen.
    samples_done: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"metric": None, "value": None, "step": None})
    history: list = dataclasses.field(default_factory=list)  # the scores of each evaluation
    train_log: list = dataclasses.field(default_factory=list)  # (step, mean train loss) at each logged step
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    # The steps since the last logged line; kept across a resume so that line averages the same steps.
    window: dict = dataclasses.field(default_factory=lambda: empty_window())

    def state_dict(self):
        state = dataclasses.asdict(self)
        state["window"]["loss"] = float(state["window"]["loss"])  # a device tensor while training
        return state

    @classmethod
    def from_state_dict(cls, state):
        state = {**state, "window": {**empty_window(), **state.get("window", {})}}  # older checkpoints lack keys
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})

    def evaluated_now(self):
        return bool(self.history) and self.history[-1]["step"] == self.step


def restore(resume_from, args, optimizer, scheduler, scaler, rank, world, samples_per_epoch):
    """The TrainState to start from: a fresh one, or the checkpoint's, with the optimizer,
    schedule, scaler and this rank's RNG streams put back as they were."""
    if not resume_from:
        return TrainState(best={"metric": args.metric_for_best, "value": None, "step": None})
    saved = load_training_state(resume_from)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # one per rank
    # A different number of ranks than before: every rank continues from rank 0's streams.
    set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    if len(rngs) != world:
        say(f"resuming with {world} process{'es' * (world != 1)} instead of {len(rngs)}: the global batch is now "
            f"{args.batch_size * args.grad_accum * world} (was {args.batch_size * args.grad_accum * len(rngs)})")
    if "samples_done" not in saved:  # written before positions were kept in samples: batches per rank
        saved["samples_done"] = saved["batches_done"] * args.batch_size * len(rngs)
    state = TrainState.from_state_dict(saved)
    say(f"resumed from {resume_from} at step {state.step} "
        f"(epoch {state.epoch}, sample {state.samples_done} of {samples_per_epoch})")
    return state


def rng_state():
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir, state, model, processor, optimizer, scheduler, scaler, rngs, samples_per_epoch,
                    card=None, args_json=None):
    """OUTPUT/checkpoint-STEP: the model, and what restore() needs to continue exactly (the TrainState,
    optimizer, scheduler, scaler, and each rank's RNG streams). args_json, the run's flags, lets a
    resume check it continues the same run."""
    path = os.path.join(output_dir, f"checkpoint-{state.step}")
    training_state = {**state.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "scaler": scaler.state_dict(), "rng": rngs}
    summary = {"step": state.step, "epoch": state.epoch + state.samples_done / samples_per_epoch,
               "best": state.best, "skipped_steps": state.skipped_steps, "history": state.history}

    def write(d):
        write_model_files(d, model, processor, card, args_json)
        torch.save(training_state, os.path.join(d, STATE_FILE))
        with open(os.path.join(d, "trainer_state.json"), "w") as f:
            json.dump(summary, f, indent=2)

    write_atomically(path, write)
    return path


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def tidy_interrupted_writes(output_dir):
    """After a crash: put back a folder that was being replaced, delete half-written ones, and
    name checkpoint folders that are not complete. Returns lines for the user."""
    if not os.path.isdir(output_dir):
        return []
    report = []
    names = sorted(os.listdir(output_dir))
    for name in names:  # a crash between the two renames of write_atomically: the old copy is whole
        m = _LEFTOVER.match(name)
        if m and m.group(2) == "old" and not os.path.exists(os.path.join(output_dir, m.group(1))):
            os.rename(os.path.join(output_dir, name), os.path.join(output_dir, m.group(1)))
            report.append(f"restored {m.group(1)} from {name} (a crash interrupted its replacement)")
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        m = _LEFTOVER.match(name)
        if m:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            report.append(f"removed {name}: an interrupted write")
        elif _CHECKPOINT.match(name) and not os.path.isfile(os.path.join(path, STATE_FILE)):
            report.append(f"ignored {name}: no {STATE_FILE}, not a complete checkpoint")
    return report


def rotate_checkpoints(output_dir, limit, keep_steps=()):
    """Delete all but the newest `limit` checkpoints, never those in keep_steps (the best, and the
    one this run resumed from). Called only after the new checkpoint is complete."""
    if limit is None or limit <= 0:
        return
    checkpoints = list_checkpoints(output_dir)
    newest = {step for step, _ in checkpoints[-limit:]}
    for step, path in checkpoints:
        if step not in newest and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)


def load_training_state(path):
    return torch.load(os.path.join(path, STATE_FILE), weights_only=True)


# ---------------------------------------------------------------------------------------------
# Reading back: a folder that was cut short or damaged after it was written (a full disk elsewhere,
# a copy that stopped, a bad block) is named by its file before anything loads it. Loaders name
# none: safetensors says "SafetensorError: incomplete metadata", torch "PytorchStreamReader failed",
# transformers a JSONDecodeError, each in a long traceback.

def damaged_file(folder, training_state=False):
    """One line naming the first file of a model folder (or checkpoint, with training_state) that
    cannot be whole, or None. Checked: every JSON file parses; every safetensors file is as long as
    its header says; every torch zip (training_state.pt, pytorch_model.bin) has its central
    directory and the crc32 of each record right. Weights that are whole but wrong are not caught
    (safetensors stores no checksum)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        return f"{folder}: {e.strerror or e}"
    if training_state and STATE_FILE not in names:
        return f"{os.path.join(folder, STATE_FILE)} is missing"
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".json"):
            problem = json_problem(path)
        elif name.endswith(".safetensors"):
            problem = safetensors_problem(path)
        elif name == STATE_FILE and training_state or name.endswith(".bin") and starts_with(path, b"PK\x03\x04"):
            problem = zip_problem(path)  # a .bin of torch before 1.6 is a plain pickle: not checked
        else:
            continue
        if problem:
            return f"{path}: {problem}"
    return None


def json_problem(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if not raw.strip():
            return "empty"
        json.loads(raw)
    except OSError as e:
        return e.strerror or str(e)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg}: line {e.lineno} column {e.colno})"
    return None


def safetensors_problem(path):
    """A safetensors file is an 8-byte header length, a JSON header of tensors with their byte ranges,
    then the bytes: a file cut short (or padded) has another size than the header adds up to."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                return f"cut short ({size} bytes), not a safetensors file"
            (header_bytes,) = struct.unpack("<Q", f.read(8))
            if header_bytes > size - 8:
                return f"cut short: its header alone needs {header_bytes + 8:,} bytes, the file has {size:,}"
            header = json.loads(f.read(header_bytes))
    except OSError as e:
        return e.strerror or str(e)
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON: not a whole safetensors file"
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, AttributeError):
        return "its header does not describe tensors: not a whole safetensors file"
    if 8 + header_bytes + end != size:
        return (f"{size:,} bytes where its header says {8 + header_bytes + end:,}: "
                + ("cut short" if size < 8 + header_bytes + end else "longer than written"))
    return None


def starts_with(path, magic):
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return True  # let the check name the error


def zip_problem(path):
    """torch.save writes a zip archive: its directory is at the end (a file cut short has none) and
    every record carries a crc32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return "cut short or damaged: not a whole torch.save archive"
    except (OSError, EOFError) as e:
        return f"unreadable ({getattr(e, 'strerror', None) or e})"
    return f"damaged: record {bad} does not match its checksum" if bad else None
