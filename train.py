"""Fine-tune GIT to caption images: our own loop in place of the HF Trainer recipe.

    python train.py --epochs 50                        # microsoft/git-base on the Pokemon captions
    python train.py --model tiny --dataset synthetic   # offline: a small GIT from scratch
    tensorboard --logdir git-base-pokemon/runs

Defaults equal the recipe (lr 5e-5, 50 epochs, batch 32, accumulation 2, evaluate and save every
50 optimizer steps, keep 3 checkpoints). Differences that matter: captions are padded per batch
and padding is ignored by the loss; the loss over an accumulated batch is normalised by its target
tokens; logits are computed for caption positions only; evaluation scores captions produced by
model.generate, not the argmax of teacher-forced logits.

Reading order: main() -> setup() (run.py: the objects, in a Run; where to start, in a TrainState)
-> train() (the loop, one iteration an optimizer step) -> finish().
"""
import contextlib
import itertools
import json
import os
import sys
import time

import cli
import distributed
import hub
import report
from cli import fail, say
from model import TINY_PRESETS
from progress import Meter, RaiseOnSignal, StopOnSignal, Stopped, compile_seconds
from run import empty_window, setup, written

SCHEDULES = ("linear", "cosine", "constant")
LOWER_IS_BETTER = ("wer", "cer", "eval_loss")


def parse_args(argv=None, **defaults):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("--dataset", default="reach-vb/pokemon-blip-captions",
      help="Hub dataset id, imagefolder folder, save_to_disk folder, COCO or Karpathy caption file (.json), "
           "or 'synthetic'")
    a("--image-column", default="image")
    a("--text-column", default="text", help="a string, or a list of strings (several references)")
    a("--image-root", default=None,
      help="folder the image paths of a COCO or Karpathy caption file are relative to (default: the file's folder)")
    a("--test-size", type=cli.fraction, default=0.1, help="held-out fraction when the source has no eval split")
    a("--synthetic-size", type=cli.positive_int, default=1000, help="scenes in --dataset synthetic")
    a("--model", default="microsoft/git-base",
      help="Hub id, save_pretrained folder, 'tiny' (a small GIT from scratch, tokenizer learned from the "
           "captions) or 'base-scratch' (git-base's architecture, random: for speed measurements)")
    a("--output-dir", default="git-base-pokemon")
    a("--overwrite-output-dir", action="store_true", help="delete an earlier run's checkpoints in --output-dir")
    a("--epochs", "--num-train-epochs", dest="epochs", type=cli.positive_float, default=50)
    a("--caption-sampling", choices=("one", "all"), default="one",
      help="images with several captions: one drawn per epoch, or all of them, each micro-batch running its "
           "images through the image encoder once for all their captions (see README: Several captions an image)")
    a("--freeze-vision", action="store_true",
      help="train the visual projection and the text decoder only; the image encoder keeps its weights")
    a("--gradient-checkpointing", action="store_true",
      help="recompute each layer's activations in backward instead of keeping them: less memory, more time")
    a("--max-steps", type=cli.positive_int, default=None, help="optimizer steps; overrides --epochs")
    a("--learning-rate", type=cli.positive_float, default=5e-5)
    a("--batch-size", "--per-device-train-batch-size", dest="batch_size", type=cli.positive_int, default=32)
    a("--eval-batch-size", "--per-device-eval-batch-size", dest="eval_batch_size", type=cli.positive_int, default=32)
    a("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=cli.positive_int, default=2)
    a("--eval-steps", type=cli.positive_int, default=50)
    a("--save-steps", type=cli.positive_int, default=50)
    a("--logging-steps", type=cli.positive_int, default=50)
    a("--save-total-limit", type=int, default=3)
    a("--warmup-steps", "--num-warmup-steps", dest="warmup_steps", type=cli.non_negative_int, default=0)
    a("--weight-decay", type=cli.non_negative_float, default=0.0)
    a("--max-grad-norm", type=cli.non_negative_float, default=1.0)
    a("--lr-schedule", "--lr-scheduler-type", dest="lr_schedule", choices=SCHEDULES, default="linear")
    a("--precision", choices=cli.PRECISIONS, default="auto",
      help="auto: fp16 + GradScaler on CUDA, bf16 on CPUs with bf16 matrix units, else fp32")
    a("--device", choices=cli.DEVICES, default="auto")
    a("--seed", type=int, default=42)
    a("--attention", choices=cli.ATTENTIONS, default="auto", help=cli.ATTENTION_HELP)
    a("--compile", action="store_true", help="torch.compile the training forward and backward, for a few fixed batch shapes "
                                            "(see README: Attention and compiling)")
    a("--num-workers", type=cli.non_negative_int, default=0)
    a("--max-bad-steps", type=cli.positive_int, default=10,
      help="fp32/bf16: stop after this many optimizer steps in a row with a non-finite loss (each is skipped)")
    a("--on-bad-sample", choices=("skip", "error"), default="skip",
      help="a row with an unreadable image or empty caption: leave it out (listed in skipped.txt) or stop")
    a("--cache-dir", default=os.environ.get("GIT_CAPTION_CACHE", os.path.join("~", ".cache", "git-caption")),
      help="where images are kept decoded, resized and cropped after the first run (env GIT_CAPTION_CACHE)")
    a("--no-cache", action="store_true", help="preprocess the images in memory each run, keep nothing on disk")
    a("--preprocessing-num-workers", type=cli.positive_int, default=cli.usable_cores(),
      help="processes that decode and resize images into the cache (default: the usable cores)")
    a("--exact-preprocessing", action="store_true",
      help="decode JPEGs at full size before resizing, so pixels equal the image processor's own output "
           "(slower; by default a large JPEG is decoded at 1/2, 1/4 or 1/8 size, see README: Data)")
    a("--max-image-pixels", type=cli.non_negative_int, default=cli.MAX_IMAGE_PIXELS, help=cli.MAX_IMAGE_PIXELS_HELP)
    a("--max-text-length", type=cli.positive_int, default=64, help="captions are truncated to this many tokens")
    a("--gen-max-length", type=cli.positive_int, default=50, help="max_length for model.generate at evaluation")
    a("--eval-num-beams", type=cli.positive_int, default=1,
      help="beams for model.generate at evaluation (1: greedy); metrics.py --model takes the same by default")
    a("--metric-for-best", choices=tuple(LOWER_IS_BETTER) + ("bleu4", "rouge_l", "cider_d"), default="wer",
      help="the evaluation score that picks best/ (and the checkpoint always kept)")
    a("--num-examples", type=cli.non_negative_int, default=3, help="example captions printed and logged per evaluation")
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
    return args


# ---------------------------------------------------------------------------------------------
# The loss and evaluation

def num_image_tokens(config):
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return patches * (config.num_image_with_embedding or 1)


def caption_loss(model, batch, num_tokens, static=False):
    """Summed next-token cross-entropy over caption tokens, divided by num_tokens.

    GIT prepends the image tokens to the caption, and its own forward projects every position
    (image tokens included) onto the vocabulary. We ask for logits only where a target exists: the
    caption position j predicts token j + 1, for every j whose target is not padding.
    static (--compile): logits at every caption position instead, padding included, so that no
    shape depends on how many targets a batch holds (each new shape would be a new compile).
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], use_cache=False)
    if static:
        logits = model(**inputs, logits_to_keep=targets.shape[1] + 1).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / num_tokens
    has_target = targets != -100
    n_img = num_image_tokens(unwrap(model).config)
    keep = has_target.new_zeros((targets.shape[0], n_img + targets.shape[1] + 1))
    keep[:, n_img:-1] = has_target
    logits = model(**inputs, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float(), targets[has_target], reduction="sum") / num_tokens


def unwrap(model):
    """The GIT model inside DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def num_targets(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def num_captions(batch):
    """Caption rows with something to predict (--caption-sampling all adds filler rows without)."""
    return int((batch["labels"][:, 1:] != -100).any(dim=1).sum())


def to_device(batch, device):
    import torch

    # Images channels-last, like the model's patch convolution (see load_data_and_model).
    return {k: v.to(device, non_blocking=True, memory_format=torch.channels_last) if v.ndim == 4
            else v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model, processor, loader, device, amp_dtype, gen_max_length, world=1, num_beams=1):
    """Teacher-forced loss over the eval split (first reference) and the captions generate() writes.
    Under torchrun each rank scores its shard and the results are gathered on every rank."""
    import torch

    model.eval()
    loss_sum, tokens, predictions, order = 0.0, 0, [], []
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            n = num_targets(batch)
            with cli.autocast(device, amp_dtype):
                loss_sum += caption_loss(model, batch, 1).item()
                generated = model.generate(pixel_values=batch["pixel_values"], max_length=gen_max_length,
                                           num_beams=num_beams)
            tokens += n
            predictions += processor.batch_decode(generated, skip_special_tokens=True)
            order += batch["index"].tolist()
    model.train()
    shards = distributed.gather((loss_sum, tokens, list(zip(order, predictions))), world)
    by_index = dict(pair for _, _, pairs in shards for pair in pairs)
    loss = sum(s[0] for s in shards) / max(sum(s[1] for s in shards), 1)
    return loss, [by_index[i] for i in range(len(by_index))]


# ---------------------------------------------------------------------------------------------
# The loop

def train(run, state, meter):
    """One iteration, one optimizer step; logs, evaluates and saves at their intervals and at the
    last step. Returns the name of the signal that stopped it early, or None."""
    args, bad_in_a_row, saved_at, stopped_by = run.args, 0, state.step, None
    run.model.train()
    bar = progress_bar(run, state)
    with StopOnSignal(say) as stop, bar:
        for micro in meter.timed(step_batches(run, state)):
            # Normalise by the target tokens of the whole accumulated batch (on all ranks), so every
            # caption token weighs the same however the batch was cut into micro-batches and ranks.
            # The ranks agree on a stop in the same all-reduce, so all of them stop after one step.
            n_tokens, captions, stops = distributed.global_sum(
                (sum(map(num_targets, micro)), sum(map(num_captions, micro)), stop.requested), run.world, run.device)
            if stops:
                stopped_by = stop.name or "a signal to another rank"
                break
            samples = sum(len(b["index"]) for b in micro) * run.world
            state.samples_done += samples
            loss, grad_norm, skipped = optimizer_step(run, micro, n_tokens)
            state.step += 1
            bar.update(1)
            state.skipped_steps += skipped
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
            if bad_in_a_row >= args.max_bad_steps and not run.scaler.is_enabled():
                fail(f"stopped at step {state.step}: the loss was not finite for {bad_in_a_row} steps in a row "
                     f"(--max-bad-steps); the last good checkpoint is left as it was")
            add_to_window(state.window, loss, samples, captions)
            if due(state.step, args.logging_steps, run.max_steps):
                log_window(run, state, meter, grad_norm, bar)
            if due(state.step, args.eval_steps, run.max_steps):
                evaluate_and_keep_best(run, state)
            if due(state.step, args.save_steps, run.max_steps):
                save(run, state)
                saved_at = state.step
            if state.window["steps"] == 0:
                meter.restart()  # evaluation and saving are not part of the next window's time
    if stopped_by is None and not state.evaluated_now():  # a run resumed from its last step
        evaluate_and_keep_best(run, state)
    if saved_at != state.step:
        save(run, state)
    return stopped_by


def progress_bar(run, state):
    from tqdm.auto import tqdm

    return tqdm(total=run.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                disable=not (sys.stderr.isatty() and run.rank == 0))


def due(step, every, last):
    return step % every == 0 or step == last


def step_batches(run, state):
    """Each optimizer step's --grad-accum micro-batches, from the state's position in the data
    on, epoch after epoch, until max_steps. An epoch's last step may have fewer micro-batches."""
    import batches

    args = run.args
    while state.step < run.max_steps:
        epoch = batches.epoch_batches(run.train_loader, state.epoch, start=state.samples_done, seed=args.seed)
        while micro := list(itertools.islice(epoch, args.grad_accum)):
            yield micro
            if state.step >= run.max_steps:
                return
        state.epoch, state.samples_done = state.epoch + 1, 0


def optimizer_step(run, micro, n_tokens):
    """Forward and backward over the micro-batches, then one optimizer step. Returns (the loss as a
    0-d tensor, summed over ranks; the gradient norm; whether the step was skipped as non-finite)."""
    import torch

    step_loss = torch.zeros((), device=run.device)
    for k, batch in enumerate(micro):
        batch = to_device(batch, run.device)
        # Gradients are averaged across ranks once per optimizer step, in the last backward.
        sync = contextlib.nullcontext() if run.world == 1 or k == len(micro) - 1 else run.net.no_sync()
        with sync:
            with cli.autocast(run.device, run.amp_dtype):
                # DDP averages over ranks; the world factor turns that average into the sum.
                loss = caption_loss(run.net, batch, n_tokens / run.world, static=run.args.compile)
            run.scaler.scale(loss).backward()
        step_loss += loss.detach() / run.world  # no .item() here: one device sync per step at most
    distributed.sum_(step_loss, run.world)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm or float("inf"))
    if run.scaler.is_enabled():  # fp16: the scaler skips a step with inf/nan gradients and lowers its scale
        scale = run.scaler.get_scale()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        skipped = run.scaler.get_scale() < scale
    else:  # fp32/bf16: nothing would catch a non-finite step, so we skip it ourselves
        skipped = not torch.isfinite(grad_norm).item()
        if not skipped:
            run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return step_loss, grad_norm, skipped


def add_to_window(window, loss, images, captions):
    window["loss"] += loss
    window["steps"] += 1
    window["samples"] += images
    window["captions"] += captions


def log_window(run, state, meter, grad_norm, bar):
    """The mean loss and the speed of the steps since the last logged line: the terminal, TensorBoard."""
    window = state.window
    mean_loss, lr = float(window["loss"]) / window["steps"], run.scheduler.get_last_lr()[0]
    captions_per_s, images_per_s, wait_share = meter.close_window(window["samples"], window["captions"], window["steps"])
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
    state.train_log.append((state.step, mean_loss))
    for name, value in (("loss", mean_loss), ("lr", lr), ("grad_norm", float(grad_norm)),
                        ("captions_per_second", captions_per_s), ("images_per_second", images_per_s),
                        ("data_wait_share", wait_share), ("skipped_steps", state.skipped_steps)):
        run.writer.add_scalar(f"train/{name}", value, state.step)
    say(f"step {state.step}/{run.max_steps} | epoch {state.epoch + state.samples_done / run.samples_per_epoch:.2f} | "
        f"loss {mean_loss:.4f} | lr {lr:.3e} | grad_norm {float(grad_norm):.3f} "
        f"| {captions_per_s:.1f} captions/s, {images_per_s:.1f} images/s | data wait {100 * wait_share:.1f}%"
        + (f" | {state.skipped_steps} steps skipped (non-finite)" if state.skipped_steps else ""))
    state.window = empty_window()


def evaluate_and_keep_best(run, state):
    """Score generated captions on the eval split; keep metrics.jsonl, and best/ when the score improved."""
    import checkpoint
    import metrics

    t0 = time.time()
    eval_loss, predictions = evaluate(run.model, run.processor, run.eval_loader, run.device, run.amp_dtype,
                                      run.args.gen_max_length, run.world, run.args.eval_num_beams)
    scores = metrics.evaluation_scores(predictions, run.eval_captions)
    show_evaluation(run, state.step, eval_loss, scores, predictions, time.time() - t0)
    state.history.append({"step": state.step, "eval_loss": eval_loss, **scores})
    metric, value, best = run.args.metric_for_best, state.history[-1][run.args.metric_for_best], state.best
    sign = 1 if metric in LOWER_IS_BETTER else -1
    improved = best["value"] is None or sign * value < sign * best["value"]
    if improved:
        best.update(value=value, step=state.step)
    if run.rank == 0:
        path = os.path.join(run.args.output_dir, "metrics.jsonl")
        written(path, checkpoint.write_file_atomically, path, "".join(json.dumps(h) + "\n" for h in state.history))
        if improved:
            best_dir = os.path.join(run.args.output_dir, "best")
            # The run's flags go with best/ so that metrics.py --model OUT/best scores it as this run did.
            written(best_dir, checkpoint.save_model, best_dir, run.model, run.processor,
                    card=card_for(run, state, best_dir, state.history[-1]),
                    args_json=json.dumps(vars(run.args), indent=2))


def show_evaluation(run, step, eval_loss, scores, predictions, seconds):
    """An evaluation's scores and first examples: the terminal, and TensorBoard's scalars, images and text."""
    import metrics

    writer, refs = run.writer, run.eval_captions
    writer.add_scalar("eval/loss", eval_loss, step)
    writer.add_scalar("eval/seconds", seconds, step)  # generation's cost, apart from training's
    for name, value in scores.items():
        writer.add_scalar(f"eval/{name}", value, step)
    shown = range(min(run.args.num_examples, len(predictions)))
    lines = [f"eval step {step}: loss {eval_loss:.4f} | wer {scores['wer']:.4f} | cer {scores['cer']:.4f} "
             f"| distinct {scores['distinct_captions']:.2f} | {seconds:.1f}s"]
    collapsed = metrics.collapse_warning(predictions, refs)
    if collapsed:
        lines.append(collapsed)
    for k in shown:
        lines.append(f"  gen: {predictions[k]!r}\n  ref: {refs[k][0]!r}")
        writer.add_image(f"eval/example_{k}", report.caption_card(run.eval_images[k], predictions[k], refs[k][0]),
                         step, dataformats="HWC")
    writer.add_text("eval/captions", "\n\n".join(f"**gen:** {predictions[k]}  \n**ref:** {refs[k][0]}"
                                                 for k in shown), step)
    say("\n".join(lines))


def card_for(run, state, where, evaluation):
    """The model card of a saved folder; scores of the evaluation at this step, if there was one."""
    from card import model_card

    scores = {k: v for k, v in evaluation.items() if k != "step"} if evaluation else None
    hub_id = run.args.hub_model_id if run.args.push_to_hub and where.endswith("best") else None
    return model_card(where, run.args, state.step, scores, run.sizes, repo_id=hub_id)


def save(run, state):
    """A checkpoint of this step. Every rank comes here (their RNG streams are gathered); rank 0 writes."""
    import checkpoint

    rngs = distributed.gather(checkpoint.rng_state(), run.world)
    if run.rank != 0:
        return
    args = run.args
    run.writer.flush()  # the TensorBoard log on disk reaches at least as far as the checkpoint
    saved = {**state.state_dict(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict(), "rng": rngs}
    summary = {"step": state.step, "epoch": state.epoch + state.samples_done / run.samples_per_epoch,
               "best": state.best, "skipped_steps": state.skipped_steps, "history": state.history}
    path = os.path.join(args.output_dir, f"checkpoint-{state.step}")
    card = card_for(run, state, path, state.history[-1] if state.evaluated_now() else None)
    written(path, checkpoint.save_checkpoint, args.output_dir, state.step, run.model, run.processor, saved, summary,
            card=card, args_json=json.dumps(vars(args), indent=2))
    checkpoint.rotate_checkpoints(args.output_dir, args.save_total_limit, keep_steps=(state.best["step"], run.resume_step))
    say(f"saved {path}")
    if args.push_to_hub and args.hub_strategy == "every_save":
        push(run, f"best model at step {state.best['step']} (training step {state.step})")


def push(run, message):
    """Upload best/; a failure is reported and remembered, never fatal: everything stays on disk."""
    best_dir = os.path.join(run.args.output_dir, "best")
    problem = hub.push_folder(best_dir, run.args.hub_model_id, message)
    if problem:
        say(f"error: --push-to-hub: could not upload {best_dir} to {run.args.hub_model_id!r} ({problem}); "
            f"the model is saved on disk")
    return problem is None


def finish(run, state, meter, stopped_by):
    """Close the logs, leave the process group, and say how the run ended; upload best/ if asked."""
    args, best = run.args, state.best
    run.writer.close()
    distributed.finish(run.world)
    if stopped_by:
        say(f"stopped by {stopped_by} at step {state.step}; checkpoint saved in "
            f"{os.path.join(args.output_dir, f'checkpoint-{state.step}')}; continue with the same command plus --resume")
        return
    if run.rank == 0:
        path = os.path.join(args.output_dir, "curves.png")
        written(path, report.draw_curves, path, state.train_log, state.history)
    if meter.summary():
        say(meter.summary())
    say(f"done: {state.step} steps | best eval {best['metric']} {best['value']:.4f} at step {best['step']} | "
        f"best model in {os.path.join(args.output_dir, 'best')} | "
        f"tensorboard --logdir {os.path.join(args.output_dir, 'runs')}")
    if args.push_to_hub and run.rank == 0:
        if not push(run, f"best model: eval {best['metric']} {best['value']:.4f} at step {best['step']}"):
            sys.exit(1)
        say(f"uploaded {os.path.join(args.output_dir, 'best')} to {args.hub_model_id}")


def main(argv=None):
    args = parse_args(argv)
    if args.push_to_hub and hub.push_problem():
        fail(f"--push-to-hub: {hub.push_problem()}")  # before hours of training, not after
    if not args.push_to_hub:
        hub.offline_unless_needed(*[n for n in (args.dataset, args.model) if n != "synthetic" and n not in TINY_PRESETS])
    with RaiseOnSignal():  # the loop stops at a step boundary; anywhere else a signal unwinds to one line
        try:
            # A rank lost under torchrun (killed, out of memory) ends the others with one line, not gloo's traceback.
            with distributed.one_line_if_a_rank_is_lost(args.output_dir), setup(args) as (run, state):
                meter = Meter(compile_seconds if args.compile else None)
                stopped_by = train(run, state, meter)
                finish(run, state, meter, stopped_by)
        except Stopped as e:
            stopped_outside_the_loop(args.output_dir, e.name)
            return None
    return state.best


def stopped_outside_the_loop(output_dir, signal_name):
    """The line for a stop while data and model load, the image cache fills, or the last checkpoint is
    written: what was being written is removed, so the newest complete checkpoint is where to go on from."""
    import checkpoint

    existing = checkpoint.list_checkpoints(output_dir)
    say(f"stopped by {signal_name} outside the training loop; "
        + (f"the newest complete checkpoint is {existing[-1][1]}: continue with the same command plus --resume"
           if existing else "no step was trained: run the same command again (the image cache keeps what it finished)"))


if __name__ == "__main__":
    main()
