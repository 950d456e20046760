"""How far drafted JPEG decoding moves the cached pixels, and a model's captions of them.

    python bench/draft_quality.py --model demo-run/best [--n 300] [--seed 9091]

Writes N drawn scenes (synthetic.scene with a seed no training here uses) scaled up to
1280 x 960 and saved as JPEG (quality 90) in a temporary folder, then preprocesses them as
prepare_split stores them twice: decoding every pixel (--exact-preprocessing) and drafted
(the JPEG decoder reads them at 1/2, 1/4 or 1/8 size, no smaller than the model's input).
Reports the difference between the two in uint8 levels, and the WER (and CER) of the captions
MODEL writes with model.generate for each set, against the scenes' captions.
"""
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from captioning import cli, decode, image_cache, measures, runtime, sources  # noqa: E402


SIZE, QUALITY = (1280, 960), 90


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", required=True, help="a save_pretrained folder (or a train.py output folder: its best/)")
    p.add_argument("--n", type=cli.positive_int, default=300, help="scenes")
    p.add_argument("--seed", type=int, default=9091, help="synthetic seed (the demo trains on 42, tests use 0-11)")
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--gen-max-length", type=cli.positive_int, default=50)
    p.add_argument("--precision", choices=cli.PRECISIONS, default="auto")
    p.add_argument("--workers", type=cli.positive_int, default=cli.usable_cores(), help="decoding processes")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text lines")
    return p.parse_args(argv)


def write_scenes(folder, n, seed):
    """n scenes scaled up to SIZE, as JPEG files with a metadata.jsonl (an imagefolder)."""
    from PIL import Image

    from captioning import synthetic

    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            image, text = synthetic.scene(seed, i)
            name = f"{i:06d}.jpg"
            image.resize(SIZE, Image.BICUBIC).save(os.path.join(folder, name), quality=QUALITY)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")


def captions_of(model, processor, pixels, args):
    """Captions model.generate writes for uint8 pixels, normalised as collate() does."""
    import torch

    from captioning import batches

    device = torch.device("cpu")
    amp_dtype, _ = runtime.pick_precision(args.precision, device)
    mean, std = batches.normaliser(processor.image_processor)
    out = []
    for i in range(0, len(pixels), args.batch_size):
        batch = (torch.from_numpy(pixels[i:i + args.batch_size].copy()).float() / 255 - mean) / std
        with torch.inference_mode(), runtime.autocast(device, amp_dtype):
            ids = model.generate(pixel_values=batch, max_length=args.gen_max_length)
        out += processor.batch_decode(ids, skip_special_tokens=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    import datasets
    import numpy as np
    import transformers
    from PIL import Image

    from captioning.gitmodel import resolve_model
    from captioning.errors import ModelLoadError
    from captioning.gitmodel import load_model

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, processor = load_model(resolve_model(args.model))
    except ModelLoadError as e:
        cli.fail(str(e))
    model.eval()
    image_processor = processor.image_processor
    draft = decode.draft_size(image_processor)
    if draft is None:
        cli.fail(f"--model {args.model!r}: its image processor's size cannot be told, so nothing would be drafted")
    with tempfile.TemporaryDirectory(prefix="draft-quality-") as folder:
        write_scenes(folder, args.n, args.seed)
        with Image.open(os.path.join(folder, "000000.jpg")) as img:
            img.draft(None, (draft, draft))
            decoded_at = img.size  # what the decoder really produces when drafting
        table = sources.load_source(folder)["train"]
        sets, seconds = {}, {}
        for name, setting in (("exact", None), ("drafted", draft)):
            t0 = time.perf_counter()
            sets[name], references = image_cache.prepare_split(table, "image", "text", "scenes", image_processor,
                                                           draft=setting, num_workers=args.workers)
            seconds[name] = time.perf_counter() - t0
    difference = np.abs(sets["drafted"].astype(np.int16) - sets["exact"].astype(np.int16))
    predictions = {name: captions_of(model, processor, pixels, args) for name, pixels in sets.items()}
    scores = {name: {k: round(v, 4) for k, v in measures.caption_scores(p, references).items()}
              for name, p in predictions.items()}
    same = float(np.mean([a == b for a, b in zip(predictions["exact"], predictions["drafted"])]))
    result = {
        "model": args.model, "scenes": args.n, "seed": args.seed, "jpeg": f"{SIZE[0]}x{SIZE[1]} quality {QUALITY}",
        "model_input": list(sets["exact"].shape[2:]), "draft": draft, "decoded_at": list(decoded_at),
        "mean_abs_difference": round(float(difference.mean()), 4),
        "per_image_mean_abs_difference_max": round(float(difference.reshape(len(difference), -1).mean(1).max()), 4),
        "share_of_values_changed": round(float((difference > 0).mean()), 4),
        "max_abs_difference": int(difference.max()),
        "preprocessing_images_per_second": {k: round(args.n / v, 1) for k, v in seconds.items()},
        "exact": scores["exact"], "drafted": scores["drafted"], "same_caption_share": round(same, 4),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.n} scenes as {result['jpeg']} JPEGs; model input {result['model_input'][0]} x "
          f"{result['model_input'][1]}; drafted JPEGs decoded at {decoded_at[0]} x {decoded_at[1]}")
    print(f"pixels: mean |drafted - exact| {result['mean_abs_difference']} uint8 levels (worst image "
          f"{result['per_image_mean_abs_difference_max']}, largest {result['max_abs_difference']}); "
          f"{result['share_of_values_changed']:.1%} of values changed")
    print(f"preprocessing, {args.workers} workers: exact {result['preprocessing_images_per_second']['exact']} "
          f"images/s, drafted {result['preprocessing_images_per_second']['drafted']} images/s")
    for name in ("exact", "drafted"):
        print(f"{name:8} WER {scores[name]['wer']:.4f} | CER {scores[name]['cer']:.4f}")
    print(f"the same caption for {same:.1%} of the scenes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
