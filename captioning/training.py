"""A training run: what it is made of (Run), and how train.py sets it up: output folder, data and
model, loaders, optimizer, then the state to start from (checkpoint.restore: a fresh TrainState, or
the checkpoint's).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time

import datasets
import numpy as np
import torch
import transformers
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from captioning import batches, checkpoint, decode, distributed, flags, image_cache, runtime, scst, sources
from captioning.cli import fail, say
from captioning.errors import DataError, ModelLoadError
from captioning.evaluation import make_eval_loader
from captioning.gitmodel import is_tiny, load_or_build_model, set_up_for_training




@dataclasses.dataclass
class Run:
    """What setup() builds for the loop; none of it is replaced while training."""
    args: argparse.Namespace
    device: object
    rank: int
    world: int
    model: object  # GIT itself: evaluation and saving use it
    net: object  # what training's forward and backward go through: the model, or its DDP / compiled wrapper
    processor: object
    amp_dtype: object  # the autocast dtype, None for fp32
    train_loader: object
    eval_loader: object
    eval_captions: list
    eval_images: list  # PIL images of the first --num-examples eval rows, for TensorBoard
    samples_per_epoch: int  # all ranks together, DistributedSampler's padding included
    max_steps: int
    optimizer: object
    scheduler: object
    scaler: object  # a GradScaler, enabled for fp16 only
    writer: object
    resume_step: object  # the step of the checkpoint resumed from, or None
    critic: object = None  # --objective scst: a scst.SelfCritic, which turns images into weighed samples

    @property
    def sizes(self):
        return {"train": len(self.train_loader.dataset), "eval": len(self.eval_loader.dataset)}


def written(what, write, *args, **kwargs):
    """A write that fails (disk full, no permission) stops the run in one line."""
    try:
        return write(*args, **kwargs)
    except OSError as e:
        fail(f"could not write {what} ({e.strerror or e}); training stopped, "
             f"the checkpoints written before are intact")


# ---------------------------------------------------------------------------------------------
# Set-up: output folder, data and model, loaders, optimizer, then the checkpoint to resume

@contextlib.contextmanager
def setup(args):
    """Yields (Run, TrainState): everything the loop uses, and where it starts (step 0, or a
    checkpoint). The output folder is this run's alone (an OS lock) until the block ends."""
    quiet_libraries()
    try:
        device, rank, world = distributed.init(runtime.pick_device(args.device))
    except ValueError as e:
        fail(str(e))
    lock = hold_output_dir(args.output_dir, rank, world, device)
    try:
        yield build(args, device, rank, world)
    finally:
        if lock:
            checkpoint.release_folder(lock)


def build(args, device, rank, world):
    """(Run, TrainState), in named steps; the output folder is already held."""
    # Every stream seeded (numpy's too: it is saved with each checkpoint), so two runs with the
    # same flags write the same files. Ranks draw their own dropout masks; DDP copies rank 0's weights.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    amp_dtype, use_scaler = runtime.pick_precision(args.precision, device)
    resume_from = prepare_output_dir(args, rank, world)
    attention = runtime.pick_attention(args.attention, device)
    model, processor, tables = load_data_and_model(args, resume_from, device, rank, world, attention)
    train_loader, eval_loader, eval_captions, eval_images = make_loaders(args, tables, processor, device, rank, world)
    steps_per_epoch = math.ceil(math.ceil(train_loader.sampler.num_samples / args.batch_size) / args.grad_accum)
    max_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    say(f"train {len(train_loader.dataset)} images{caption_count(train_loader.dataset, args)}, "
        f"eval {len(eval_loader.dataset)} | {steps_per_epoch} steps/epoch, {max_steps} steps | "
        f"{parameter_count(model)} | {device} "
        f"{'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1]}, {attention} attention"
        + (f" | {world} processes, global batch {args.batch_size * args.grad_accum * world}" if world > 1 else ""))
    optimizer, scheduler, scaler = make_optimizer(args, model, max_steps, device, use_scaler)
    samples_per_epoch = train_loader.sampler.total_size
    state = checkpoint.restore(resume_from, args, optimizer, scheduler, scaler, rank, world, samples_per_epoch)
    run = Run(args=args, device=device, rank=rank, world=world, model=model, net=wrap_for_training(model, args, device, world),
              processor=processor, amp_dtype=amp_dtype, train_loader=train_loader, eval_loader=eval_loader,
              eval_captions=eval_captions, eval_images=eval_images, samples_per_epoch=samples_per_epoch,
              max_steps=max_steps, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              writer=open_writer(args, rank, state.step if resume_from else None),
              resume_step=state.step if resume_from else None,
              critic=self_critic(args, model, processor, train_loader.dataset) if args.objective == "scst" else None)
    return run, state


def self_critic(args, model, processor, train_set):
    """--objective scst's SelfCritic, rewarding against the training split's references."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    try:
        return scst.SelfCritic(train_set.references, processor.tokenizer,
                               processor.tokenizer.sep_token_id if eos is None else eos, args)
    except ValueError as e:
        fail(f"--objective scst: {e}")


def caption_count(dataset, args):
    captions = sum(map(len, dataset.token_ids))
    if captions == len(dataset):
        return ""
    return f" with {captions} captions ({'all' if args.caption_sampling == 'all' else 'one drawn'} per image an epoch)"


def parameter_count(model):
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total / 1e6:.1f}M params" + (f", {trained / 1e6:.1f}M trained" if trained < total else "")


def quiet_libraries():
    transformers.logging.set_verbosity_error()  # the PIL-backend notice on every processor load is noise
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def hold_output_dir(output_dir, rank, world, device):
    """Rank 0 takes the OS lock on --output-dir before anything in it is read, tidied or written;
    a folder held by another live run stops every rank in one line and is left as it is.
    Returns the lock (an open file; closing it lets the folder go), None on other ranks."""
    lock, holder = None, None
    if rank == 0:
        try:
            lock = checkpoint.lock_folder(output_dir)
        except checkpoint.FolderBusy as e:
            holder = str(e)
        except OSError as e:
            fail(f"--output-dir {output_dir!r}: {e.strerror or e}")
    if distributed.global_sum((holder is not None,), world, device)[0]:
        fail(f"--output-dir {output_dir!r} is in use by another training run ({holder}); "
             f"wait for it to end, or choose another --output-dir")
    return lock


def prepare_output_dir(args, rank, world):
    """Tidy what a crash left in --output-dir, refuse to mix two runs, and check that a resume
    continues the same run; returns the checkpoint to resume from, or None."""
    if rank == 0:
        for line in checkpoint.tidy_interrupted_writes(args.output_dir):
            print(f"{args.output_dir}: {line}", flush=True)
    distributed.barrier(world)
    existing = checkpoint.list_checkpoints(args.output_dir)
    resume_from = None
    if args.resume == "latest":
        if not existing:
            fail(f"--resume: no complete checkpoint in {args.output_dir!r} to continue from")
        resume_from = newest_whole_checkpoint(existing)
    elif args.resume is not None:
        if not os.path.isfile(os.path.join(args.resume, checkpoint.STATE_FILE)):
            fail(f"--resume: {args.resume!r} is not a checkpoint folder (no {checkpoint.STATE_FILE})")
        problem = checkpoint.damaged_file(args.resume, training_state=True)
        if problem:
            fail(f"--resume: {problem}; the checkpoint cannot be resumed from")
        resume_from = args.resume
    elif existing and not args.overwrite_output_dir:
        fail(f"{args.output_dir!r} already holds checkpoints of a run; pass --resume to continue it "
             f"or --overwrite-output-dir to start over")
    elif args.overwrite_output_dir and rank == 0:
        for name in [os.path.basename(p) for _, p in existing] + ["best", "runs"]:
            shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
    if resume_from:
        check_resume_flags(args, saved_args(resume_from, args.output_dir))
    distributed.barrier(world)
    return resume_from


def newest_whole_checkpoint(existing):
    """The newest of the (step, path) checkpoints whose files are whole; each damaged one newer than it
    is named (every rank checks, rank 0 says so). None whole: one line, the run stops."""
    for _, path in reversed(existing):
        problem = checkpoint.damaged_file(path, training_state=True)
        if not problem:
            return path
        say(f"--resume: skipping {os.path.basename(path)}, it is damaged ({problem}); trying the one before it")
    fail(f"--resume: every checkpoint in {os.path.dirname(existing[0][1])!r} is damaged (see above); "
         f"start a new run, or --model a folder of weights")


def saved_args(resume_from, output_dir):
    """The flags of the run that wrote the checkpoint (its own copy, else the output folder's), or None."""
    for folder in (resume_from, output_dir):
        try:
            with open(os.path.join(folder, "training_args.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return None


def check_resume_flags(args, saved):
    if saved is None:
        say("--resume: no training_args.json beside the checkpoint; the flags given are taken as they are")
        return
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    changed = [(name, saved[name], getattr(args, name)) for name in sorted(saved)
               if name not in flags.NOT_COMPARED and hasattr(args, name) and saved[name] != getattr(args, name)]
    refused = [c for c in changed if c[0] in flags.FIXED_ON_RESUME]
    if refused:
        fail("--resume: " + ", ".join(f"{flag(n)} {new} (was {old})" for n, old, new in refused)
             + " would change which samples a step sees or what it computes; resume with the values the run "
               "started with, or start a new run from the checkpoint's weights (--model CHECKPOINT --output-dir NEW)")
    if changed:
        say("resuming with changed flags: " + ", ".join(f"{flag(n)} {new} (was {old})" for n, old, new in changed))


def load_data_and_model(args, resume_from, device, rank, world, attention="eager"):
    """(model on device, processor, (train table, eval table)); bad data or model names stop in one line."""
    say(f"loading dataset {args.dataset!r}")
    try:
        tables = sources.load_tables(args)
    except DataError as e:
        fail(str(e))
    # A tiny GIT learns its tokenizer from the training captions; rank 0 writes it, then the others load it.
    captions = sources.caption_texts(tables[0], args.text_column) if is_tiny(args.model) and not resume_from else []
    with distributed.first_then_others(rank == 0, world):
        try:
            model, processor = load_or_build_model(args, captions, resume_from, build=rank == 0, attention=attention)
        except ModelLoadError as e:
            fail(f"{e}, or --model tiny to train a small GIT from scratch")
    # Channels-last for the ViT's patch convolution: a git-base-sized step took 4.6 s instead of
    # 5.0-5.3 s on this CPU (README: Speed). Only 4-D weights change layout.
    model.to(device, memory_format=torch.channels_last)
    set_up_for_training(model, args.freeze_vision, args.gradient_checkpointing)
    return model, processor, tables


def make_loaders(args, tables, processor, device, rank, world):
    """(train loader, eval loader, eval references, eval example images). Images are decoded,
    resized and cropped once and kept as uint8 at the model's resolution, in the cache (memory-mapped)
    unless --no-cache; each node's first rank fills the cache, the others read it."""
    t0 = time.time()
    cache_dir = None if args.no_cache else os.path.expanduser(args.cache_dir)
    skipped = [] if args.on_bad_sample == "skip" else None
    prepared = []
    draft = None if args.exact_preprocessing else decode.draft_size(processor.image_processor)
    # Without a cache every rank decodes for itself: the node's cores are shared among its ranks.
    workers = args.preprocessing_num_workers if cache_dir else \
        max(1, args.preprocessing_num_workers // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    # Each node's first process fills the cache (nodes need not share a disk); the others then read it.
    with distributed.first_then_others(int(os.environ.get("LOCAL_RANK", rank)) == 0, world):
        for table, what in zip(tables, ("train", "eval")):
            try:
                prepared.append(image_cache.prepare_split(table, args.image_column, args.text_column, what,
                                                      processor.image_processor, skipped, cache_dir, draft=draft,
                                                      num_workers=workers, notify=say,
                                                      max_pixels=args.max_image_pixels))
            except DataError as e:
                fail(str(e))
            except OSError as e:
                fail(f"--cache-dir {cache_dir!r}: {e.strerror or e} (or pass --no-cache)")
    say(f"images ready in {time.time() - t0:.1f}s" + (f" (cache: {cache_dir})" if cache_dir else " (not cached)"))
    if skipped and rank == 0:
        listing = os.path.join(args.output_dir, "skipped.txt")
        written(listing, checkpoint.write_file_atomically, listing, "".join(line + "\n" for line in skipped))
        say(f"skipped {len(skipped)} bad rows (unreadable images, empty captions): listed in {listing}")
    for what, (_, captions) in zip(("train", "eval"), prepared):
        if not captions:
            fail(f"no usable {what} rows left in {args.dataset!r} after skipping bad ones")
    (train_pixels, train_captions), (eval_pixels, eval_captions) = prepared
    train_set = batches.build_dataset(train_pixels, train_captions, processor, args.max_text_length, args.seed,
                                      all_captions=args.caption_sampling == "all")
    pad_id, pin = processor.tokenizer.pad_token_id, device.type == "cuda"
    train_loader = batches.make_loader(train_set, args.batch_size, batches.EpochSampler(
        len(train_set), seed=args.seed, num_replicas=world, rank=rank), pad_id, args.num_workers, pin,
        static_length=args.max_text_length if args.compile else None)
    eval_loader = make_eval_loader(args, eval_pixels, eval_captions, processor, device, rank, world)
    eval_images = [Image.fromarray(np.asarray(eval_pixels[k]).transpose(1, 2, 0))
                   for k in range(min(args.num_examples, len(eval_captions)))]
    return train_loader, eval_loader, eval_captions, eval_images


def wrap_for_training(model, args, device, world):
    """What training's forward and backward go through: under torchrun a DDP wrapper, which
    averages the gradients across ranks during backward; compiled with --compile, for fixed shapes
    (the loader pads batches to a few shapes, each compiled once: see batches.collate)."""
    net = model if world == 1 else DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if not args.compile:
        return net
    # Each (captions per image, length bucket) pair is a shape; let all of them compile, not just 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(net, dynamic=False)


def lr_factor(schedule, warmup, total):
    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return f


def make_optimizer(args, model, max_steps, device, use_scaler):
    """(AdamW, learning-rate schedule, GradScaler)."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # --freeze-vision leaves the image encoder out
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and LayerNorms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate,
                                  fused=True)  # one kernel over all tensors: 0.06 s vs 0.48 s a step at git-base size on CPU
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.lr_schedule, args.warmup_steps, max_steps))
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=use_scaler)


def open_writer(args, rank, resumed_step):
    """TensorBoard's writer on rank 0 (a stand-in elsewhere); writes training_args.json beside it."""
    if rank != 0:
        return distributed.Silent()
    path = os.path.join(args.output_dir, "training_args.json")
    written(path, checkpoint.write_file_atomically, path, json.dumps(vars(args), indent=2))
    # After a crash the log may run past the checkpoint; TensorBoard hides what a killed run wrote
    # after it (steps from purge_step on), so the curve continues without doubled steps.
    return SummaryWriter(os.path.join(args.output_dir, "runs"),
                         purge_step=None if resumed_step is None else resumed_step + 1)
