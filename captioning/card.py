"""Model cards in the Hugging Face Hub's format, written into best/ and every checkpoint."""
import json
import os

from captioning import flags
from captioning.hub import looks_like_path
from captioning.presets import SYNTHETIC


def generate_options(args):
    """The generation settings evaluation used, as model.generate's keyword arguments."""
    return f"max_length={args.gen_max_length}, num_beams={getattr(args, 'eval_num_beams', 1)}"


def card_arguments(args):
    """The training arguments a card lists; SCST's settings only for an SCST run."""
    scst = getattr(args, "objective", None) == "scst"
    return {k: getattr(args, k) for k in flags.CARD_FLAGS
            if hasattr(args, k) and (scst or not k.startswith("scst_"))}


def model_card(where, args, step, scores, data_sizes, repo_id=None):
    """README.md text for the model saved at `where` (loaded by that path, or by repo_id once pushed)."""
    name = repo_id or os.path.abspath(where)
    hub_dataset = args.dataset if args.dataset != SYNTHETIC and not looks_like_path(args.dataset) else None
    hub_model = args.model if args.model != "tiny" and not looks_like_path(args.model) else None
    header = ["---", "library_name: transformers", "pipeline_tag: image-to-text",
              "tags:", "- image-captioning", "- git"]
    if hub_model:
        header.append(f"base_model: {hub_model}")
    if hub_dataset:
        header += ["datasets:", f"- {hub_dataset}"]
    header += ["metrics:", "- wer", "- bleu", "- rouge", "- cider"]
    if scores:
        header += [
            "model-index:", f"- name: {os.path.basename(name.rstrip('/'))}", "  results:",
            "  - task:", "      type: image-to-text", "      name: Image captioning",
            "    dataset:", f"      name: {hub_dataset or os.path.basename(args.dataset.rstrip('/'))}",
            f"      type: {hub_dataset or 'local'}", "      split: held-out", "    metrics:",
        ]
        for key, label in (("wer", "WER"), ("cer", "CER"), ("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"),
                           ("cider_d", "CIDEr-D")):
            if key in scores:
                header += [f"    - type: {key}", f"      value: {scores[key]:.4f}",
                           f"      name: {label} of generated captions"]
    header.append("---")

    what = ("A small GIT trained from scratch (`--model tiny`)" if args.model == "tiny"
            else f"GIT (`{args.model}`) fine-tuned")
    lines = [f"# {os.path.basename(name.rstrip('/'))}", "",
             f"{what} to caption images with train.py, a plain PyTorch loop, on `{args.dataset}`: "
             f"{data_sizes['train']} training images, {data_sizes['eval']} held out.", ""]
    if getattr(args, "objective", "cross-entropy") == "scst":
        baseline = ("the mean reward of the image's other samples" if args.scst_baseline == "mean"
                    else "the reward of its greedy caption")
        lines += [f"Trained with self-critical sequence training (SCST), starting from `{args.model}`: "
                  f"{args.scst_samples} captions sampled per image, each rewarded by its CIDEr-D against the "
                  f"image's references, minus {baseline}.", ""]
    if scores:
        lines += ["## Evaluation", "",
                  f"Captions written by `model.generate({generate_options(args)})` on the held-out "
                  f"images, scored against their reference captions (lower-cased, punctuation removed), "
                  f"at optimizer step {step}:", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in scores.items() if isinstance(v, float)]
        lines.append("")
    lines += ["## Usage", "", "```python", "from PIL import Image",
              "from transformers import AutoModelForCausalLM, AutoProcessor", "",
              f"model = AutoModelForCausalLM.from_pretrained({name!r})",
              f"processor = AutoProcessor.from_pretrained({name!r})",
              'image = Image.open("image.png").convert("RGB")',
              'pixel_values = processor(images=image, return_tensors="pt").pixel_values',
              f"ids = model.generate(pixel_values=pixel_values, {generate_options(args)})",
              "print(processor.batch_decode(ids, skip_special_tokens=True)[0])", "```", "",
              "## Training arguments", "", "```json",
              json.dumps(card_arguments(args), indent=2), "```", ""]
    return "\n".join(header) + "\n" + "\n".join(lines)
