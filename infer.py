"""Caption images with a fine-tuned GIT.

    python infer.py img.png [more.jpg ...]            # prints path<TAB>caption per image
    python infer.py --model git-base-pokemon/best img.png

Runs on CUDA (fp16 autocast) when there is a GPU, else on the CPU in fp32. An image that is
missing or unreadable gets one line on stderr; the others are still captioned; exit status 1.
"""
import argparse
import os
import sys

import hub


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default="git-base-pokemon/best",
                   help="a save_pretrained folder (train.py writes OUT/best) or a Hub id")
    p.add_argument("--max-length", type=int, default=50, help="max_length for model.generate")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if args.max_length <= 0 or args.batch_size <= 0:
        p.error("--max-length and --batch-size must be positive")
    return args


def caption_images(model, processor, images, max_length=50, batch_size=16):
    """Greedy captions for a list of RGB PIL images."""
    import torch

    device = next(model.parameters()).device
    captions = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            ids = model.generate(pixel_values=pixels.to(device), max_length=max_length)
        captions += processor.batch_decode(ids, skip_special_tokens=True)
    return captions


def main(argv=None):
    args = parse_args(argv)
    hub.offline_unless_needed(args.model)
    import torch
    import transformers

    from data import DataError, open_image
    from model import ModelLoadError, load_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for, but no CUDA GPU is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        model, processor = load_model(args.model)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    paths, images, failed = [], [], 0
    for path in args.images:
        try:
            images.append(open_image(path))
            paths.append(path)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    for path, caption in zip(paths, caption_images(model, processor, images, args.max_length, args.batch_size)):
        print(f"{path}\t{caption}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
