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
import functools
import itertools
import json
import os
import sys
import time

from captioning import flags, hub
from captioning.cli import fail, say
from captioning.presets import SYNTHETIC, is_tiny
from captioning.progress import Meter, RaiseOnSignal, StopOnSignal, Stopped


# ---------------------------------------------------------------------------------------------
# The loop

def train(run, state, meter):
    """One iteration, one optimizer step; logs, evaluates and saves at their intervals and at the
    last step. Returns the name of the signal that stopped it early, or None."""
    from captioning import distributed, evaluation

    args, bad_in_a_row, saved_at, stopped_by = run.args, 0, state.step, None
    run.model.train()
    bar = progress_bar(run, state)
    with StopOnSignal(say) as stop, bar:
        for micro in meter.timed(step_batches(run, state)):
            sampling = ()
            if run.critic:  # SCST: the images' captions give way to K of the model's own, weighed by advantage
                micro, sampling = sample_captions(run, micro, state.epoch)
            # Normalise by the target tokens of the whole accumulated batch (on all ranks), so every
            # caption token weighs the same however the batch was cut into micro-batches and ranks.
            # The ranks agree on a stop in the same all-reduce, so all of them stop after one step.
            n_tokens, captions, stops, *sampling = distributed.global_sum(
                (sum(map(evaluation.num_targets, micro)), sum(map(evaluation.num_captions, micro)), stop.requested,
                 *sampling), run.world, run.device)
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
            add_to_window(state.window, loss, samples, captions, sampling)
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
    from captioning import batches

    args = run.args
    while state.step < run.max_steps:
        epoch = batches.epoch_batches(run.train_loader, state.epoch, start=state.samples_done, seed=args.seed)
        while micro := list(itertools.islice(epoch, args.grad_accum)):
            yield micro
            if state.step >= run.max_steps:
                return
        state.epoch, state.samples_done = state.epoch + 1, 0


def sample_captions(run, micro, epoch):
    """--objective scst: every micro-batch sampled before any loss pass (the step's token count,
    which normalises the loss, is known only then). Returns the sampled batches, each row weighed
    by its advantage, and scst.STATS summed over them."""
    sampled = [run.critic.sampled(run.model, batch, epoch, run.device, run.amp_dtype) for batch in micro]
    return [batch for batch, _ in sampled], [sum(column) for column in zip(*(stats for _, stats in sampled))]


def optimizer_step(run, micro, n_tokens):
    """Forward and backward over the micro-batches, then one optimizer step. Returns (the loss as a
    0-d tensor, summed over ranks; the gradient norm; whether the step was skipped as non-finite)."""
    import torch

    from captioning import distributed, evaluation, runtime

    step_loss = torch.zeros((), device=run.device)
    for k, batch in enumerate(micro):
        batch = evaluation.to_device(batch, run.device)
        # Gradients are averaged across ranks once per optimizer step, in the last backward.
        sync = contextlib.nullcontext() if run.world == 1 or k == len(micro) - 1 else run.net.no_sync()
        with sync:
            with runtime.autocast(run.device, run.amp_dtype):
                # DDP averages over ranks; the world factor turns that average into the sum.
                loss = evaluation.caption_loss(run.net, batch, n_tokens / run.world, static=run.args.compile,
                                               label_smoothing=run.args.label_smoothing,
                                               row_weights=batch.get("row_weights"))
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


def add_to_window(window, loss, images, captions, sampling=()):
    window["loss"] += loss
    window["steps"] += 1
    window["samples"] += images
    window["captions"] += captions
    if sampling:
        window["sampling"] = [a + b for a, b in itertools.zip_longest(window["sampling"], sampling, fillvalue=0.0)]


def log_window(run, state, meter, grad_norm, bar):
    """The mean loss and the speed of the steps since the last logged line: the terminal, TensorBoard."""
    from captioning import checkpoint, scst

    window = state.window
    mean_loss, lr = float(window["loss"]) / window["steps"], run.scheduler.get_last_lr()[0]
    captions_per_s, images_per_s, wait_share = meter.close_window(window["samples"], window["captions"], window["steps"])
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
    state.train_log.append((state.step, mean_loss))
    for name, value in (("loss", mean_loss), ("lr", lr), ("grad_norm", float(grad_norm)),
                        ("captions_per_second", captions_per_s), ("images_per_second", images_per_s),
                        ("data_wait_share", wait_share), ("skipped_steps", state.skipped_steps)):
        run.writer.add_scalar(f"train/{name}", value, state.step)
    sampled = scst.window_means(window["sampling"]) if window["sampling"] else None
    for name, value in (sampled or {}).items():
        run.writer.add_scalar(f"train/scst_{name}", value, state.step)
    say(f"step {state.step}/{run.max_steps} | epoch {state.epoch + state.samples_done / run.samples_per_epoch:.2f} | "
        f"loss {mean_loss:.4f} | lr {lr:.3e} | grad_norm {float(grad_norm):.3f} "
        f"| {captions_per_s:.1f} captions/s, {images_per_s:.1f} images/s | data wait {100 * wait_share:.1f}%"
        + (f" | {state.skipped_steps} steps skipped (non-finite)" if state.skipped_steps else "")
        + (f" | scst reward {sampled['reward']:.4f} (baseline {sampled['baseline']:.4f}, advantage spread "
           f"{sampled['advantage_spread']:.4f}) | sample length {sampled['sample_length']:.1f} tokens, "
           f"{100 * sampled['distinct_samples']:.0f}% distinct" if sampled else ""))
    state.window = checkpoint.empty_window()


def evaluate_and_keep_best(run, state):
    """Score generated captions on the eval split; keep metrics.jsonl, and best/ when the score improved."""
    from captioning import checkpoint, coco_eval, evaluation, measures
    from captioning.training import written

    t0 = time.time()
    eval_loss, predictions = evaluation.evaluate(run.model, run.processor, run.eval_loader, run.device, run.amp_dtype,
                                      run.args.gen_max_length, run.world, run.args.eval_num_beams)
    scores = measures.evaluation_scores(predictions, run.eval_captions)
    seconds = time.time() - t0  # eval/seconds: generation and our scores, not the COCO table's Java programs
    if run.args.coco_eval and run.rank == 0:  # its Java programs run once, not once a rank
        scores.update(coco_eval.coco_table(predictions, run.eval_captions, note=say_once))
    show_evaluation(run, state.step, eval_loss, scores, predictions, seconds)
    state.history.append({"step": state.step, "eval_loss": eval_loss, **scores})
    metric, value, best = run.args.metric_for_best, state.history[-1][run.args.metric_for_best], state.best
    sign = 1 if metric in flags.LOWER_IS_BETTER else -1
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


COCO_SHOWN = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")  # on the log line; all of them in TensorBoard
# A missing COCO score is said once a run, not at every evaluation.
say_once = functools.cache(say)


def show_evaluation(run, step, eval_loss, scores, predictions, seconds):
    """An evaluation's scores and first examples: the terminal, and TensorBoard's scalars, images and text."""
    from captioning import measures, report

    writer, refs = run.writer, run.eval_captions
    writer.add_scalar("eval/loss", eval_loss, step)
    writer.add_scalar("eval/seconds", seconds, step)  # generation's cost, apart from training's
    for name, value in scores.items():
        writer.add_scalar(f"eval/{name}", value, step)
    shown = range(min(run.args.num_examples, len(predictions)))
    coco = " ".join(f"{name} {scores[name]:.4f}" for name in COCO_SHOWN if name in scores)
    lines = [f"eval step {step}: loss {eval_loss:.4f} | wer {scores['wer']:.4f} | cer {scores['cer']:.4f} "
             f"| distinct {scores['distinct_captions']:.2f}" + (f" | COCO {coco}" if coco else "") + f" | {seconds:.1f}s"]
    collapsed = measures.collapse_warning(predictions, refs)
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
    from captioning.card import model_card

    scores = {k: v for k, v in evaluation.items() if k != "step"} if evaluation else None
    hub_id = run.args.hub_model_id if run.args.push_to_hub and where.endswith("best") else None
    return model_card(where, run.args, state.step, scores, run.sizes, repo_id=hub_id)


def save(run, state):
    """A checkpoint of this step. Every rank comes here (their RNG streams are gathered); rank 0 writes."""
    from captioning import checkpoint, distributed
    from captioning.training import written

    rngs = distributed.gather(checkpoint.rng_state(), run.world)
    if run.rank != 0:
        return
    args = run.args
    run.writer.flush()  # the TensorBoard log on disk reaches at least as far as the checkpoint
    path = os.path.join(args.output_dir, f"checkpoint-{state.step}")
    card = card_for(run, state, path, state.history[-1] if state.evaluated_now() else None)
    written(path, checkpoint.save_checkpoint, args.output_dir, state, run.model, run.processor, run.optimizer,
            run.scheduler, run.scaler, rngs, run.samples_per_epoch, card=card, args_json=json.dumps(vars(args), indent=2))
    checkpoint.rotate_checkpoints(args.output_dir, args.save_total_limit, keep_steps=(state.best["step"], run.resume_step))
    say(f"saved {path}")
    if args.push_to_hub and args.hub_strategy == "every_save":
        push(run, f"best model at step {state.best['step']} (training step {state.step})")


def push(run, message):
    """Upload best/; a failure is reported and remembered, never fatal: everything stays on disk."""
    from captioning import upload

    best_dir = os.path.join(run.args.output_dir, "best")
    problem = upload.push_folder(best_dir, run.args.hub_model_id, message)
    if problem:
        say(f"error: --push-to-hub: could not upload {best_dir} to {run.args.hub_model_id!r} ({problem}); "
            f"the model is saved on disk")
    return problem is None


def finish(run, state, meter, stopped_by):
    """Close the logs, leave the process group, and say how the run ended; upload best/ if asked."""
    from captioning import distributed, report
    from captioning.training import written

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
    args = flags.parse_args(argv, description=__doc__)
    if args.push_to_hub:
        from captioning import upload

        if upload.push_problem():
            fail(f"--push-to-hub: {upload.push_problem()}")  # before hours of training, not after
    else:
        hub.offline_unless_needed(*[n for n in (args.dataset, args.model) if n != SYNTHETIC and not is_tiny(n)])
    # Heavy imports (torch, transformers, datasets) after the flags are checked: --help answers at once.
    from captioning import distributed
    from captioning.runtime import compile_seconds
    from captioning.training import setup

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
    from captioning import checkpoint

    existing = checkpoint.list_checkpoints(output_dir)
    say(f"stopped by {signal_name} outside the training loop; "
        + (f"the newest complete checkpoint is {existing[-1][1]}: continue with the same command plus --resume"
           if existing else "no step was trained: run the same command again (the image cache keeps what it finished)"))


if __name__ == "__main__":
    main()
