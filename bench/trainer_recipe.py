"""Baseline: fine-tune GIT with the HF Trainer as the Transformers "Image captioning" guide does.

By default one change to the recipe: captions are padded to the longest in each batch, not to
512 (`--padding max_length` restores the guide's padding to the tokenizer's model_max_length).
Kept from the recipe on purpose: images are decoded and preprocessed by the `set_transform` at
every batch; labels are the input ids, so the loss also trains on padding; model selection uses
eval loss; the guide's compute_metrics (WER of argmax logits vs labels). That metric compares
misaligned sequences (GIT's logits include the image-token positions), so after training we also
score captions written by model.generate on the held-out split, with the same scoring code as
train.py (`--skip-generation-eval` leaves that out, for speed measurements).

Takes train.py's flags (same names, defaults and checks) plus the two above.

    python bench/trainer_recipe.py --model tiny --dataset synthetic --max-steps 200
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from captioning import decode, errors, flags, hub, measures, sources  # noqa: E402
from captioning.cli import fail
from captioning.runtime import pick_precision
from captioning.presets import TINY_PRESETS
from captioning.gitmodel import load_or_build_model


def parse_args(argv=None):
    own = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    own.add_argument("--padding", choices=("longest", "max_length"), default="longest",
                     help="longest: pad each batch to its longest caption; max_length: the guide's padding "
                          "to the tokenizer's model_max_length")
    own.add_argument("--skip-generation-eval", action="store_true",
                     help="do not caption the held-out images after training")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print("trainer_recipe.py's own flags (the others are train.py's, below):\n" + own.format_help())
    extra, rest = own.parse_known_args(argv)
    # The same flags (names, defaults, checks) as train.py, so both programs get the same run.
    args = flags.parse_args(rest, output_dir="bench-trainer-out")
    args.padding, args.skip_generation_eval = extra.padding, extra.skip_generation_eval
    return args


def main(argv=None):
    args = parse_args(argv)
    hub.offline_unless_needed(*[n for n in (args.dataset, args.model) if n != "synthetic" and n not in TINY_PRESETS])
    import datasets
    import jiwer
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments

    from captioning import batches

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; the Trainer keeps its own
    datasets.disable_progress_bars()

    # As in the guide, images stay encoded in the table until a batch needs them, so decoding is
    # part of every training step (train.py decodes each image once, before training).
    try:
        train_table, eval_table = sources.load_tables(args)
    except errors.DataError as e:
        fail(str(e))
    for table, what in ((train_table, "train"), (eval_table, "eval")):
        bad = next((i for i, text in enumerate(table[args.text_column]) if not sources.caption_refs(text)), None)
        if bad is not None:  # an unreadable image only shows when its batch is decoded, as in the guide
            fail(f"{what} row {bad}: no caption in column {args.text_column!r}")
    model, processor = load_or_build_model(args, sources.caption_texts(train_table, args.text_column))

    def transforms(batch):
        images = [decode.open_image(sources.image_cell(cell, i)[1]) for i, cell in enumerate(batch[args.image_column])]
        # The recipe trains on one caption per image: the first reference, as train.py evaluates.
        texts = [sources.caption_refs(text)[0] for text in batch[args.text_column]]
        # The DataLoader fetches a whole batch through Dataset.__getitems__, so "longest" pads per
        # batch; "max_length" pads to model_max_length (512 for git-base), as the guide does.
        inputs = processor(images=images, text=texts, padding=args.padding)
        inputs["labels"] = inputs["input_ids"]
        return inputs

    train_ds = sources.undecoded(train_table, args.image_column)
    eval_ds = sources.undecoded(eval_table, args.image_column)
    train_ds.set_transform(transforms)
    eval_ds.set_transform(transforms)

    def preprocess_logits_for_metrics(logits, labels):
        return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)

    def compute_metrics(eval_pred):
        predicted, labels = eval_pred
        # Batches of different lengths are concatenated with -100 fill, which the tokenizer cannot decode.
        predicted = [[t for t in row if t >= 0] for row in predicted.tolist()]
        labels = [[t for t in row if t >= 0] for row in labels.tolist()]
        decoded_predictions = processor.batch_decode(predicted, skip_special_tokens=True)
        decoded_labels = processor.batch_decode(labels, skip_special_tokens=True)
        return {"wer_score": jiwer.wer(decoded_labels, decoded_predictions)}  # = evaluate.load("wer")

    on_cuda = torch.cuda.is_available()
    amp, _ = pick_precision(args.precision, torch.device("cuda" if on_cuda else "cpu"))
    precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp]
    print(f"precision: {precision}", flush=True)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not on_cuda,  # 5.x refuses bf16=True on a CPU-only machine without it
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_schedule,
        max_grad_norm=args.max_grad_norm,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        remove_unused_columns=False,
        label_names=["labels"],
        load_best_model_at_end=True,
        dataloader_num_workers=args.num_workers,
        report_to="none",
        push_to_hub=False,
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics)
    t0 = time.time()
    train_output = trainer.train()
    train_seconds = time.time() - t0
    evals = [h for h in trainer.state.log_history if "eval_wer_score" in h]
    argmax_wer = evals[-1]["eval_wer_score"] if evals else None

    result = {
        "precision": precision,
        "padding": args.padding,
        "train_seconds": train_seconds,
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
        "global_steps": train_output.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "recipe_argmax_wer_last_eval": argmax_wer,
        "eval_images": len(eval_table),
    }
    print(f"train_seconds: {train_seconds:.1f}")
    print(f"train_samples_per_second: {result['train_samples_per_second']:.2f} (Trainer's figure, includes eval and saves)")
    print(f"recipe_argmax_wer_last_eval: {argmax_wer if argmax_wer is None else round(argmax_wer, 4)} (misaligned, misleading)")
    if not args.skip_generation_eval:
        # Honest evaluation: captions the (best) model writes itself, scored as train.py scores them.
        eval_images, eval_captions = sources.read_rows(eval_table, args.image_column, args.text_column, "eval")
        model = trainer.model
        model.eval()
        pixels = batches.pixel_values(processor.image_processor, eval_images)
        predictions = []
        with torch.no_grad(), torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for i in range(0, len(pixels), args.eval_batch_size):
                batch = pixels[i:i + args.eval_batch_size].to(model.device)
                generated = model.generate(pixel_values=batch, max_length=args.gen_max_length)
                predictions += processor.batch_decode(generated, skip_special_tokens=True)
        scores = measures.caption_scores(predictions, eval_captions)
        result.update(generation_wer=scores["wer"], generation_cer=scores["cer"])
        print(f"generation_wer: {scores['wer']:.4f}")
        print(f"generation_cer: {scores['cer']:.4f}")
        for k in range(min(3, len(predictions))):
            print(f"  gen: {predictions[k]!r}\n  ref: {eval_captions[k][0]!r}")
    with open(os.path.join(args.output_dir, "bench_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
