"""Fine-tune GIT to caption images: our own loop in place of the HF Trainer recipe.

    python train.py --epochs 50                        # microsoft/git-base on the Pokemon captions
    python train.py --model tiny --dataset synthetic   # offline: a small GIT from scratch
    tensorboard --logdir git-base-pokemon/runs

Defaults equal the recipe (lr 5e-5, 50 epochs, batch 32, accumulation 2, evaluate and save every
50 optimizer steps, keep 3 checkpoints). Differences that matter: captions are padded per batch
and padding is ignored by the loss; the loss over an accumulated batch is normalised by its target
tokens; logits are computed for caption positions only; evaluation scores captions produced by
model.generate, not the argmax of teacher-forced logits.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time

import distributed
import hub
import report
from model import TINY_PRESETS as TINY
from model import pick_precision

SCHEDULES = ("linear", "cosine", "constant")
LOWER_IS_BETTER = ("wer", "cer", "eval_loss")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error; under torchrun from rank 0 only
        self.exit(2, f"{self.prog}: error: {message}\n" if first_rank() else None)


def parse_args(argv=None, **defaults):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="reach-vb/pokemon-blip-captions",
      help="Hub dataset id, imagefolder folder, save_to_disk folder, or 'synthetic'")
    a("--image-column", default="image")
    a("--text-column", default="text", help="a string, or a list of strings (several references)")
    a("--test-size", type=float, default=0.1, help="held-out fraction when the source has no eval split")
    a("--synthetic-size", type=int, default=1000, help="scenes in --dataset synthetic")
    a("--model", default="microsoft/git-base",
      help="Hub id, save_pretrained folder, 'tiny' (a small GIT from scratch, tokenizer learned from the "
           "captions) or 'base-scratch' (git-base's architecture, random: for speed measurements)")
    a("--output-dir", default="git-base-pokemon")
    a("--overwrite-output-dir", action="store_true", help="delete an earlier run's checkpoints in --output-dir")
    a("--epochs", "--num-train-epochs", dest="epochs", type=float, default=50)
    a("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    a("--learning-rate", type=float, default=5e-5)
    a("--batch-size", "--per-device-train-batch-size", dest="batch_size", type=int, default=32)
    a("--eval-batch-size", "--per-device-eval-batch-size", dest="eval_batch_size", type=int, default=32)
    a("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=int, default=2)
    a("--eval-steps", type=int, default=50)
    a("--save-steps", type=int, default=50)
    a("--logging-steps", type=int, default=50)
    a("--save-total-limit", type=int, default=3)
    a("--warmup-steps", "--num-warmup-steps", dest="warmup_steps", type=int, default=0)
    a("--weight-decay", type=float, default=0.0)
    a("--max-grad-norm", type=float, default=1.0)
    a("--lr-schedule", "--lr-scheduler-type", dest="lr_schedule", choices=SCHEDULES, default="linear")
    a("--precision", choices=PRECISIONS, default="auto",
      help="auto: fp16 + GradScaler on CUDA, bf16 on CPUs with bf16 matrix units, else fp32")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--seed", type=int, default=42)
    a("--compile", action="store_true", help="torch.compile the training forward and backward (see README: Speed)")
    a("--num-workers", type=int, default=0)
    a("--max-bad-steps", type=int, default=10,
      help="fp32/bf16: stop after this many optimizer steps in a row with a non-finite loss (each is skipped)")
    a("--on-bad-sample", choices=("skip", "error"), default="skip",
      help="a row with an unreadable image or empty caption: leave it out (listed in skipped.txt) or stop")
    a("--cache-dir", default=os.environ.get("GIT_CAPTION_CACHE", os.path.join("~", ".cache", "git-caption")),
      help="where images are kept decoded, resized and cropped after the first run (env GIT_CAPTION_CACHE)")
    a("--no-cache", action="store_true", help="preprocess the images in memory each run, keep nothing on disk")
    a("--max-text-length", type=int, default=64, help="captions are truncated to this many tokens")
    a("--gen-max-length", type=int, default=50, help="max_length for model.generate at evaluation")
    a("--metric-for-best", choices=tuple(LOWER_IS_BETTER) + ("bleu4", "rouge_l", "cider_d"), default="wer",
      help="the evaluation score that picks best/ (and the checkpoint always kept)")
    a("--num-examples", type=int, default=3, help="example captions printed and logged per evaluation")
    a("--push-to-hub", action="store_true", help="upload best/ with its model card to the Hub at the end")
    a("--hub-model-id", default=None, help="owner/name of the Hub repo (default: the --output-dir folder name)")
    a("--hub-strategy", choices=("end", "every_save"), default="end",
      help="every_save: also upload best/ after each checkpoint")
    a("--trust-remote-code", action="store_true",
      help="allow a model that ships its own Python code (auto_map in its config) to run it")
    a("--resume", "--resume-from-checkpoint", dest="resume", nargs="?", const="latest", default=None,
      help="continue from the newest checkpoint in --output-dir (or from the folder given)")
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if args.hub_model_id is None:
        args.hub_model_id = os.path.basename(os.path.abspath(args.output_dir))
    for name in ("batch_size", "eval_batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps",
                 "max_bad_steps",
                 "max_text_length", "gen_max_length", "synthetic_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("learning_rate", "epochs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_steps is not None and args.max_steps <= 0:
        p.error("--max-steps must be positive")
    if not 0 < args.test_size < 1:
        p.error("--test-size must be between 0 and 1")
    for name in ("warmup_steps", "weight_decay", "num_workers", "max_grad_norm", "num_examples"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    return args


def first_rank():
    """True but in torchrun's ranks 1, 2...: every rank meets the same bad flag or data, and one says so."""
    return os.environ.get("RANK", "0") == "0"


def fail(message):
    if first_rank():
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name if name != "auto" else "cpu")


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


def num_image_tokens(config):
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return patches * (config.num_image_with_embedding or 1)


def caption_loss(model, batch, num_tokens):
    """Summed next-token cross-entropy over caption tokens, divided by num_tokens.

    GIT prepends the image tokens to the caption, and its own forward projects every position
    (image tokens included) onto the vocabulary. We ask for logits only where a target exists: the
    caption position j predicts token j + 1, for every j whose target is not padding.
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    has_target = targets != -100
    n_img = num_image_tokens(unwrap(model).config)
    keep = has_target.new_zeros((targets.shape[0], n_img + targets.shape[1] + 1))
    keep[:, n_img:-1] = has_target
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], logits_to_keep=keep, use_cache=False).logits
    return F.cross_entropy(logits.float(), targets[has_target], reduction="sum") / num_tokens


def unwrap(model):
    """The GIT model inside DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def num_targets(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def to_device(batch, device):
    import torch

    # Images channels-last, like the model's patch convolution (see main).
    return {k: v.to(device, non_blocking=True, memory_format=torch.channels_last) if v.ndim == 4
            else v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model, processor, loader, device, autocast, gen_max_length, world=1):
    """Teacher-forced loss over the eval split (first reference) and the captions generate() writes.
    Under torchrun each rank scores its shard and the results are gathered on every rank."""
    import torch

    model.eval()
    loss_sum, tokens, predictions, order = 0.0, 0, [], []
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            n = num_targets(batch)
            with autocast():
                loss_sum += caption_loss(model, batch, 1).item()
                generated = model.generate(pixel_values=batch["pixel_values"], max_length=gen_max_length)
            tokens += n
            predictions += processor.batch_decode(generated, skip_special_tokens=True)
            order += batch["index"].tolist()
    model.train()
    shards = distributed.gather((loss_sum, tokens, list(zip(order, predictions))), world)
    by_index = dict(pair for _, _, pairs in shards for pair in pairs)
    loss = sum(s[0] for s in shards) / max(sum(s[1] for s in shards), 1)
    return loss, [by_index[i] for i in range(len(by_index))]


def load_tables(args):
    """(train table, eval table) of --dataset, images not yet decoded; raises data.DataError."""
    import data

    source = data.load_source(args.dataset, seed=args.seed, synthetic_size=args.synthetic_size)
    train_table, eval_table = data.split_source(source, args.test_size, args.seed)
    data.check_columns(train_table, args.image_column, args.text_column, "train")
    data.check_columns(eval_table, args.image_column, args.text_column, "eval")
    return train_table, eval_table


def load_or_build_model(args, captions, resume_from=None, build=True):
    """The checkpoint being resumed, a tiny GIT built for the training captions (a list of strings),
    or --model; raises ModelLoadError. build=False: another process builds the tiny GIT's folder."""
    from model import build_tiny_git, is_tiny, load_model

    if resume_from:
        return load_model(resume_from, trust_remote_code=args.trust_remote_code)
    if is_tiny(args.model):
        init_dir = os.path.join(args.output_dir, "init-model")
        if build:
            build_tiny_git(captions, init_dir, preset=args.model, seed=args.seed)
        return load_model(init_dir)
    return load_model(args.model, trust_remote_code=args.trust_remote_code)


def main(argv=None):
    args = parse_args(argv)
    if args.push_to_hub and hub.push_problem():
        fail(f"--push-to-hub: {hub.push_problem()}")  # before hours of training, not after
    if not args.push_to_hub:
        hub.offline_unless_needed(*[n for n in (args.dataset, args.model) if n != "synthetic" and n not in TINY])
    # Heavy imports after argument parsing, so --help and flag errors answer at once.
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    import datasets
    import transformers

    import batches
    import checkpoint
    import data
    import metrics
    from card import model_card
    from model import ModelLoadError, is_tiny
    import numpy as np
    from PIL import Image

    transformers.logging.set_verbosity_error()  # the PIL-backend notice on every processor load is noise
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    device, rank, world = distributed.init(pick_device(args.device))
    main_rank = rank == 0  # the one process that prints, logs and writes files

    def say(message):
        if main_rank:
            tqdm.write(message)
            sys.stdout.flush()  # a log file or a pipe should see each line when it happens
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # ranks draw their own dropout masks; DDP copies rank 0's weights
    amp_dtype, use_scaler = pick_precision(args.precision, device)

    def barrier():
        distributed.barrier(world)

    def written(what, write, *a, **kw):
        """A write that fails (disk full, no permission) stops the run in one line."""
        try:
            return write(*a, **kw)
        except OSError as e:
            fail(f"could not write {what} ({e.strerror or e}); training stopped, "
                 f"the checkpoints written before are intact")

    # ---- output folder: clean up after a crash, refuse to mix two runs
    if main_rank:
        for line in checkpoint.tidy_interrupted_writes(args.output_dir):
            print(f"{args.output_dir}: {line}", flush=True)
    barrier()
    existing = checkpoint.list_checkpoints(args.output_dir)
    resume_from = None
    if args.resume == "latest":
        if not existing:
            fail(f"--resume: no complete checkpoint in {args.output_dir!r} to continue from")
        resume_from = existing[-1][1]
    elif args.resume is not None:
        if not os.path.isfile(os.path.join(args.resume, checkpoint.STATE_FILE)):
            fail(f"--resume: {args.resume!r} is not a checkpoint folder (no {checkpoint.STATE_FILE})")
        resume_from = args.resume
    elif existing and not args.overwrite_output_dir:
        fail(f"{args.output_dir!r} already holds checkpoints of a run; pass --resume to continue it "
             f"or --overwrite-output-dir to start over")
    elif args.overwrite_output_dir and main_rank:
        for name in [os.path.basename(p) for _, p in existing] + ["best", "runs"]:
            shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        fail(f"--output-dir {args.output_dir!r}: {e.strerror}")
    barrier()

    # ---- data and model
    say(f"loading dataset {args.dataset!r}")
    try:
        train_table, eval_table = load_tables(args)
    except data.DataError as e:
        fail(str(e))
    # A tiny GIT learns its tokenizer from the training captions; rank 0 writes it first.
    tiny_captions = data.caption_texts(train_table, args.text_column) if is_tiny(args.model) and not resume_from else []
    if not main_rank:
        barrier()
    try:
        model, processor = load_or_build_model(args, tiny_captions, resume_from, build=main_rank)
    except ModelLoadError as e:
        fail(f"{e}, or --model tiny to train a small GIT from scratch")
    if main_rank:
        barrier()
    # Channels-last for the ViT's patch convolution: a git-base-sized step took 4.6 s instead of
    # 5.0-5.3 s on this CPU (README: Speed). Only 4-D weights change layout.
    model.to(device, memory_format=torch.channels_last)

    # Images are decoded, resized and cropped once and kept as uint8 at the model's resolution, in
    # the cache (memory-mapped) unless --no-cache; rank 0 fills the cache, the others read it.
    t0 = time.time()
    cache_dir = None if args.no_cache else os.path.expanduser(args.cache_dir)
    skipped = [] if args.on_bad_sample == "skip" else None
    if not main_rank:
        barrier()
    try:
        train_pixels, train_captions = batches.prepare_split(train_table, args.image_column, args.text_column, "train",
                                                          processor.image_processor, skipped, cache_dir)
        eval_pixels, eval_captions = batches.prepare_split(eval_table, args.image_column, args.text_column, "eval",
                                                        processor.image_processor, skipped, cache_dir)
    except data.DataError as e:
        fail(str(e))
    except OSError as e:
        fail(f"--cache-dir {cache_dir!r}: {e.strerror or e} (or pass --no-cache)")
    if main_rank:
        barrier()
    say(f"images ready in {time.time() - t0:.1f}s" + (f" (cache: {cache_dir})" if cache_dir else " (not cached)"))
    if skipped and main_rank:
        listing = os.path.join(args.output_dir, "skipped.txt")
        written(listing, checkpoint.write_file_atomically, listing, "".join(line + "\n" for line in skipped))
        say(f"skipped {len(skipped)} bad rows (unreadable images, empty captions): listed in {listing}")
    for what, captions in (("train", train_captions), ("eval", eval_captions)):
        if not captions:
            fail(f"no usable {what} rows left in {args.dataset!r} after skipping bad ones")
    # Forward and backward of training go through `net`; under torchrun it averages the gradients
    # across ranks during backward. Evaluation and saving use `model` itself.
    net = model if world == 1 else DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    pad_id = processor.tokenizer.pad_token_id

    train_set = batches.build_dataset(train_pixels, train_captions, processor, args.max_text_length, args.seed)
    eval_set = batches.build_dataset(eval_pixels, eval_captions, processor, args.max_text_length, args.seed)
    eval_images = [Image.fromarray(np.asarray(eval_pixels[k]).transpose(1, 2, 0))  # for TensorBoard's cards
                   for k in range(min(args.num_examples, len(eval_captions)))]
    train_sampler = batches.EpochSampler(len(train_set), seed=args.seed, num_replicas=world, rank=rank)
    pin = device.type == "cuda"
    train_loader = batches.make_loader(train_set, args.batch_size, train_sampler, pad_id, args.num_workers, pin)
    eval_loader = batches.make_loader(eval_set, args.eval_batch_size, batches.ShardSampler(len(eval_set), world, rank),
                                   pad_id, args.num_workers, pin)
    batches_per_epoch = math.ceil(train_sampler.num_samples / args.batch_size)  # per rank
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    max_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    say(f"train {len(train_set)} images, eval {len(eval_set)} | {steps_per_epoch} steps/epoch, {max_steps} steps | "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {device} "
        f"{'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1]}"
        + (f" | {world} processes, global batch {args.batch_size * args.grad_accum * world}" if world > 1 else ""))

    # ---- optimizer, schedule, mixed precision
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # biases and LayerNorms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate,
                                  fused=True)  # one kernel over all tensors: 0.06 s vs 0.48 s a step at git-base size on CPU
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.lr_schedule, args.warmup_steps, max_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    step, epoch, batches_done, best = 0, 0, 0, {"metric": args.metric_for_best, "value": None, "step": None}
    history, train_log = [], []  # evaluations, and (step, mean train loss) at each logging step
    skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
    window = {"loss": 0.0, "steps": 0, "samples": 0}  # train steps since the last logged line
    resume_step = None
    if resume_from:
        state = checkpoint.load_training_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank
        # A different number of ranks than before: every rank continues from rank 0's streams.
        checkpoint.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
        step, epoch, batches_done, best = state["step"], state["epoch"], state["batches_done"], state["best"]
        history, train_log, skipped_steps = state["history"], state["train_log"], state["skipped_steps"]
        window, resume_step = state.get("window", window), step
        say(f"resumed from {resume_from} at step {step} (epoch {epoch}, batch {batches_done})")

    # After a crash the log may run past the checkpoint; TensorBoard hides what a killed run wrote
    # after it (steps from purge_step on), so the curve continues without doubled steps.
    writer = SummaryWriter(os.path.join(args.output_dir, "runs"), purge_step=step + 1 if resume_from else None) \
        if main_rank else distributed.Silent()
    if main_rank:
        path = os.path.join(args.output_dir, "training_args.json")
        written(path, checkpoint.write_file_atomically, path, json.dumps(vars(args), indent=2))

    def run_eval():
        t0 = time.time()
        eval_loss, predictions = evaluate(model, processor, eval_loader, device, autocast, args.gen_max_length, world)
        scores = metrics.caption_scores(predictions, eval_captions)
        writer.add_scalar("eval/loss", eval_loss, step)
        writer.add_scalar("eval/seconds", time.time() - t0, step)  # generation's cost, apart from training's
        for name, value in scores.items():
            writer.add_scalar(f"eval/{name}", value, step)
        lines = [f"eval step {step}: loss {eval_loss:.4f} | wer {scores['wer']:.4f} | cer {scores['cer']:.4f} "
                 f"| {time.time() - t0:.1f}s"]
        for k in range(min(args.num_examples, len(predictions))):
            lines.append(f"  gen: {predictions[k]!r}\n  ref: {eval_captions[k][0]!r}")
            if main_rank:
                card = report.caption_card(eval_images[k], predictions[k], eval_captions[k][0])
                writer.add_image(f"eval/example_{k}", card, step, dataformats="HWC")
        writer.add_text("eval/captions", "\n\n".join(f"**gen:** {predictions[k]}  \n**ref:** {eval_captions[k][0]}"
                                                     for k in range(min(args.num_examples, len(predictions)))), step)
        say("\n".join(lines))
        history.append({"step": step, "eval_loss": eval_loss, **scores})
        value = history[-1][args.metric_for_best]
        sign = 1 if args.metric_for_best in LOWER_IS_BETTER else -1
        improved = best["value"] is None or sign * value < sign * best["value"]
        if improved:
            best.update(value=value, step=step)
        if main_rank:
            path = os.path.join(args.output_dir, "metrics.jsonl")
            written(path, checkpoint.write_file_atomically, path, "".join(json.dumps(h) + "\n" for h in history))
            if improved:
                best_dir = os.path.join(args.output_dir, "best")
                written(best_dir, checkpoint.save_model, best_dir, model, processor,
                        card=card_for(best_dir, history[-1]))
        return scores

    def card_for(where, evaluation):
        scores = {k: v for k, v in evaluation.items() if k != "step"} if evaluation else None
        return model_card(where, args, step, scores, {"train": len(train_set), "eval": len(eval_set)},
                          repo_id=args.hub_model_id if args.push_to_hub and where.endswith("best") else None)

    def push(message):
        """Upload best/; a failure is reported and remembered, never fatal: everything stays on disk."""
        problem = hub.push_folder(os.path.join(args.output_dir, "best"), args.hub_model_id, message)
        if problem:
            say(f"error: --push-to-hub: could not upload {os.path.join(args.output_dir, 'best')} "
                f"to {args.hub_model_id!r} ({problem}); the model is saved on disk")
        return problem is None

    def save():
        """Every rank comes here (their RNG states are gathered); rank 0 writes."""
        rngs = distributed.gather(checkpoint.rng_state(), world)
        if not main_rank:
            return
        writer.flush()  # the TensorBoard log on disk reaches at least as far as the checkpoint
        state = {"step": step, "epoch": epoch, "batches_done": batches_done, "best": dict(best),
                 "history": list(history), "train_log": list(train_log), "skipped_steps": skipped_steps,
                 "window": {k: float(v) if k == "loss" else v for k, v in window.items()},
                 "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs}
        summary = {"step": step, "epoch": epoch + batches_done / batches_per_epoch, "best": best,
                   "skipped_steps": skipped_steps, "history": history}
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        evaluation = history[-1] if history and history[-1]["step"] == step else None
        written(path, checkpoint.save_checkpoint, args.output_dir, step, model, processor, state, summary,
                card=card_for(path, evaluation))
        checkpoint.rotate_checkpoints(args.output_dir, args.save_total_limit, keep_steps=(best["step"], resume_step))
        say(f"saved {path}")
        if args.push_to_hub and args.hub_strategy == "every_save":
            push(f"best model at step {best['step']} (training step {step})")

    # ---- the loop: one iteration = one optimizer step over grad_accum micro-batches
    model.train()
    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (sys.stderr.isatty() and main_rank))
    last_save = step  # a resumed run starts from a saved step
    last_eval = step if history and history[-1]["step"] == step else -1
    window_t0 = time.time()
    # Time spent waiting for the next batches: when it is a large share of the step the loader is
    # the bottleneck (more --num-workers). Per logging window and over the whole run.
    waited, run_waited, run_seconds, run_samples, run_steps = 0.0, 0.0, 0.0, 0, 0
    bad_in_a_row = 0
    # Ctrl-C or SIGTERM (a scheduler taking the machine back) ends the run at the next step
    # boundary with a checkpoint; a second one interrupts at once. Under torchrun the ranks agree
    # on it at the start of each step, so all of them stop after the same one.
    stop_signal, stopped = [], False

    def on_signal(signum, frame):
        if stop_signal:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        stop_signal.append(signal.Signals(signum).name)
        say(f"{stop_signal[0]}: finishing this step and saving a checkpoint (again to stop at once)")

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    while step < max_steps and not stopped:
        epoch_iter = batches.epoch_batches(train_loader, epoch, start=batches_done * args.batch_size, seed=args.seed)
        while step < max_steps:
            t_fetch = time.perf_counter()
            micro = list(itertools.islice(epoch_iter, args.grad_accum))
            waited += time.perf_counter() - t_fetch
            if not micro:
                break
            # Normalise by the target tokens of the whole accumulated batch (on all ranks), so every
            # caption token weighs the same however the batch was cut into micro-batches and ranks.
            n_tokens, stops = distributed.global_sum((sum(num_targets(b) for b in micro), len(stop_signal)),
                                                     world, device)
            if stops:
                stopped = True
                break
            batches_done += len(micro)
            step_loss = torch.zeros((), device=device)
            for k, b in enumerate(micro):
                b = to_device(b, device)
                # Gradients are averaged across ranks once per optimizer step, in the last backward.
                sync = contextlib.nullcontext() if world == 1 or k == len(micro) - 1 else net.no_sync()
                with sync:
                    with autocast():
                        # DDP averages over ranks; the world factor turns that average into the sum.
                        loss = caption_loss(net, b, n_tokens / world)
                    scaler.scale(loss).backward()
                step_loss += loss.detach() / world  # no .item() here: one device sync per step at most
            distributed.sum_(step_loss, world)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
            if use_scaler:  # fp16: the scaler skips a step with inf/nan gradients and lowers its scale
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                bad_step = scaler.get_scale() < scale
            else:  # fp32/bf16: nothing would catch a non-finite step, so we skip it ourselves
                bad_step = not torch.isfinite(grad_norm).item()
                if not bad_step:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            bar.update(1)
            skipped_steps += bad_step
            bad_in_a_row = bad_in_a_row + 1 if bad_step else 0
            if bad_in_a_row >= args.max_bad_steps and not use_scaler:
                fail(f"stopped at step {step}: the loss was not finite for {bad_in_a_row} steps in a row "
                     f"(--max-bad-steps); the last good checkpoint is left as it was")

            window["loss"] += step_loss
            window["steps"] += 1
            window["samples"] += sum(len(b["index"]) for b in micro) * world
            if step % args.logging_steps == 0 or step == max_steps:
                mean_loss, lr = float(window["loss"]) / window["steps"], scheduler.get_last_lr()[0]
                seconds = time.time() - window_t0
                speed, wait_share = window["samples"] / seconds, min(waited / seconds, 1.0)
                run_waited, run_seconds = run_waited + waited, run_seconds + seconds
                run_samples, run_steps = run_samples + window["samples"], run_steps + window["steps"]
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                writer.add_scalar("train/loss", mean_loss, step)
                train_log.append((step, mean_loss))
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("train/samples_per_second", speed, step)
                writer.add_scalar("train/data_wait_share", wait_share, step)
                writer.add_scalar("train/skipped_steps", skipped_steps, step)
                say(f"step {step}/{max_steps} | epoch {epoch + batches_done / batches_per_epoch:.2f} | "
                    f"loss {mean_loss:.4f} | lr {lr:.3e} | grad_norm {float(grad_norm):.3f} "
                    f"| {speed:.1f} samples/s | data wait {100 * wait_share:.1f}%"
                    + (f" | {skipped_steps} steps skipped (non-finite)" if skipped_steps else ""))
                window = {"loss": 0.0, "steps": 0, "samples": 0}
            if step % args.eval_steps == 0 or step == max_steps:
                run_eval()
                last_eval = step
            if step % args.save_steps == 0 or step == max_steps:
                save()
                last_save = step
            if window["steps"] == 0:  # evaluation and saving are not part of the next window's time
                window_t0, waited = time.time(), 0.0
        else:
            break
        if not stopped:
            epoch, batches_done = epoch + 1, 0
    bar.close()
    for s, handler in previous_handlers.items():
        signal.signal(s, handler)
    if stopped:
        if last_save != step:
            save()
        writer.close()
        distributed.finish(world)
        say(f"stopped by {stop_signal[0] if stop_signal else 'a signal to another rank'} at step {step}; "
            f"checkpoint saved in {os.path.join(args.output_dir, f'checkpoint-{step}')}; "
            f"continue with the same command plus --resume")
        return best
    if last_eval != step:
        run_eval()
    if last_save != step:
        save()
    writer.close()
    distributed.finish(world)
    if main_rank:
        path = os.path.join(args.output_dir, "curves.png")
        written(path, report.draw_curves, path, train_log, history)
    if run_seconds:
        say(f"training speed: {run_samples / run_seconds:.1f} samples/s, {run_seconds / run_steps:.3f} s per "
            f"optimizer step, data wait {100 * run_waited / run_seconds:.1f}% (evaluation and saving excluded)")
    say(f"done: {step} steps | best eval {best['metric']} {best['value']:.4f} at step {best['step']} | "
        f"best model in {os.path.join(args.output_dir, 'best')} | "
        f"tensorboard --logdir {os.path.join(args.output_dir, 'runs')}")
    if args.push_to_hub and main_rank:
        if not push(f"best model: eval {best['metric']} {best['value']:.4f} at step {best['step']}"):
            sys.exit(1)
        say(f"uploaded {os.path.join(args.output_dir, 'best')} to {args.hub_model_id}")
    return best


if __name__ == "__main__":
    main()
