"""Baseline: fine-tune GIT with the HF Trainer as the Transformers "Image captioning" guide does.

The one change to the recipe: captions are padded to the longest in each batch, not to 512.
Kept from the recipe on purpose: labels are the input ids, so the loss also trains on padding;
model selection uses eval loss; the guide's compute_metrics (WER of argmax logits vs labels).
That metric compares misaligned sequences (GIT's logits include the image-token positions), so
after training we also score captions written by model.generate on the held-out split, with the
same data loading and scoring code as train.py.

    python bench/trainer_recipe.py --model tiny --dataset synthetic --max-steps 200
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="reach-vb/pokemon-blip-captions")
    a("--image-column", default="image")
    a("--text-column", default="text")
    a("--test-size", type=float, default=0.1)
    a("--synthetic-size", type=int, default=1000)
    a("--model", default="microsoft/git-base")
    a("--output-dir", default="bench-trainer-out")
    a("--epochs", "--num-train-epochs", dest="epochs", type=float, default=50)
    a("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    a("--learning-rate", type=float, default=5e-5)
    a("--batch-size", "--per-device-train-batch-size", dest="batch_size", type=int, default=32)
    a("--eval-batch-size", "--per-device-eval-batch-size", dest="eval_batch_size", type=int, default=32)
    a("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=int, default=2)
    a("--eval-steps", type=int, default=50)
    a("--save-steps", type=int, default=50, help="must be a multiple of --eval-steps (load_best_model_at_end)")
    a("--logging-steps", type=int, default=50)
    a("--seed", type=int, default=42)
    a("--gen-max-length", type=int, default=50)
    a("--num-workers", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import datasets
    import jiwer
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments

    import data
    import metrics
    from model import build_tiny_git, is_tiny, load_model
    from train import cpu_has_bf16_units

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; the Trainer keeps its own

    source = data.load_source(args.dataset, seed=args.seed, synthetic_size=args.synthetic_size)
    train_table, eval_table = data.split_source(source, args.test_size, args.seed)
    train_images, train_captions = data.read_rows(train_table, args.image_column, args.text_column, "train")
    eval_images, eval_captions = data.read_rows(eval_table, args.image_column, args.text_column, "eval")

    if is_tiny(args.model):
        init_dir = os.path.join(args.output_dir, "init-model")
        build_tiny_git([c for refs in train_captions for c in refs], init_dir, preset=args.model, seed=args.seed)
        model, processor = load_model(init_dir)
    else:
        model, processor = load_model(args.model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    # The recipe trains on one caption per image: the first reference, as train.py evaluates.
    def table(images, captions):
        return datasets.Dataset.from_dict({"image": images, "text": [refs[0] for refs in captions]})

    def transforms(batch):
        # The DataLoader fetches a whole batch through Dataset.__getitems__, so "longest" pads per batch.
        inputs = processor(images=batch["image"], text=batch["text"], padding="longest")
        inputs["labels"] = inputs["input_ids"]
        return inputs

    train_ds, eval_ds = table(train_images, train_captions), table(eval_images, eval_captions)
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
    precision = "fp16" if on_cuda else "bf16" if cpu_has_bf16_units() else "fp32"
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
        save_total_limit=3,
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

    # Honest evaluation: captions the (best) model writes itself, scored as train.py scores them.
    model = trainer.model
    model.eval()
    amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pixels = data.pixel_values(processor.image_processor, eval_images)
    predictions = []
    with torch.no_grad(), torch.autocast(model.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for i in range(0, len(pixels), args.eval_batch_size):
            batch = pixels[i:i + args.eval_batch_size].to(model.device)
            generated = model.generate(pixel_values=batch, max_length=args.gen_max_length)
            predictions += processor.batch_decode(generated, skip_special_tokens=True)
    scores = metrics.caption_scores(predictions, eval_captions)

    result = {
        "precision": precision,
        "train_seconds": train_seconds,
        "train_samples_per_second": train_output.metrics["train_samples_per_second"],
        "global_steps": train_output.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "recipe_argmax_wer_last_eval": argmax_wer,
        "generation_wer": scores["wer"],
        "generation_cer": scores["cer"],
        "eval_images": len(eval_images),
    }
    print(f"train_seconds: {train_seconds:.1f}")
    print(f"train_samples_per_second: {result['train_samples_per_second']:.2f} (Trainer's figure, includes eval and saves)")
    print(f"recipe_argmax_wer_last_eval: {argmax_wer if argmax_wer is None else round(argmax_wer, 4)} (misaligned, misleading)")
    print(f"generation_wer: {scores['wer']:.4f}")
    print(f"generation_cer: {scores['cer']:.4f}")
    for k in range(min(3, len(predictions))):
        print(f"  gen: {predictions[k]!r}\n  ref: {eval_captions[k][0]!r}")
    with open(os.path.join(args.output_dir, "bench_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
