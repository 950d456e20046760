"""Look at a captioning source before training on it, or write the synthetic one to disk.

The sources themselves (--dataset: Hub ids, imagefolders, save_to_disk folders, COCO and Karpathy
files, synthetic scenes) are read by captioning/sources.py, as train.py reads them.

    python data.py synthetic --size 500 --out scenes/   # write the synthetic set as an imagefolder
    python data.py preview --dataset scenes/ --n 5 --out samples.png   # the guide's row of captioned images
    python data.py stats --dataset scenes/                # split sizes, caption lengths, image sizes, bad rows
"""
import json
import os
import sys

from captioning import cli, hub
from captioning.cli import fail
from captioning.errors import DataError
from captioning.presets import SYNTHETIC, is_tiny


# ---------------------------------------------------------------------------------------------
# Command line: synthetic, preview, stats

def cli_splits(args):
    """(train table, eval table, how the eval split was made) as train.py's load_tables gets them."""
    if args.dataset != SYNTHETIC:
        hub.offline_unless_needed(args.dataset)  # before datasets is imported
    import datasets

    from captioning import sources

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    source = sources.source_of(args)
    train_table, eval_table = sources.split_source(source, args.test_size, args.seed, args.eval_split)
    _, own = sources.split_names(source, args.eval_split)
    how = f"the source's own {own!r} split" if own else \
        f"split from train, test-size {args.test_size}, seed {args.seed}"
    return train_table, eval_table, how


def preview(args):
    """The HF captioning guide's plot_images: one row of training images titled with their captions."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    from captioning import sources

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        fail(f"--out {args.out!r}: folder {out_dir!r} does not exist")
    train_table, _, _ = cli_splits(args)
    sources.check_columns(train_table, args.image_column, args.text_column, "train")
    n = min(args.n, len(train_table))
    if n == 0:
        fail(f"dataset {args.dataset!r} has no training rows to preview")
    images, captions = sources.read_rows(train_table.select(range(n)), args.image_column, args.text_column, "train")
    titles = ["\n".join(textwrap.wrap(refs[0], 12)) for refs in captions]
    lines = max(t.count("\n") + 1 for t in titles)
    panel = PREVIEW_PANEL_INCHES
    fig, axes = plt.subplots(1, n, figsize=(panel * n, panel + 0.2 * lines + 0.3), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, wspace=0.1,
                        top=1 - (0.2 * lines + 0.2) / (panel + 0.2 * lines + 0.3))
    fig.savefig(args.out, dpi=PREVIEW_DPI, format="png")
    plt.close(fig)
    print(args.out)


PREVIEW_PANEL_INCHES, PREVIEW_DPI = 2.5, 100  # the PNG is n * 250 pixels wide
WARNING_NAMES = 5  # rows named per kind of warning


def caption_counter(model):
    """(unit description, function caption -> length): the model's tokenizer, or whitespace words."""
    if is_tiny(model):
        return "words (whitespace)", lambda text: len(text.split())
    if hub.looks_like_path(model) and not os.path.isdir(model):
        fail(f"--model folder {model!r} does not exist")
    hub.offline_unless_needed(model)
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        where = "folder" if os.path.isdir(model) else ("not a local folder and could not be loaded from the "
                                                       "Hugging Face Hub (offline and not cached, or no such repo)")
        text = str(e).strip().splitlines()
        fail(f"--model {model!r}: no tokenizer could be loaded ({where}: {text[0] if text else type(e).__name__})")
    return (f"tokens ({model} tokenizer, special tokens included)",
            lambda text: len(tokenizer(text)["input_ids"]))


def summary(values, percentiles=()):
    """min / median / [pNN] / max of a list of numbers; None values when the list is empty."""
    import numpy as np

    keys = ["min", "median", *[f"p{q}" for q in percentiles], "max"]
    if not values:
        return dict.fromkeys(keys)
    arr = np.asarray(values, dtype=np.float64)
    out = [arr.min(), np.median(arr), *[np.percentile(arr, q) for q in percentiles], arr.max()]
    return {k: (int(v) if float(v).is_integer() else round(float(v), 2)) for k, v in zip(keys, out)}


def scan_rows(ds, image_column, text_column, what, count, found, warnings):
    """A tolerant read_rows: image sizes, references per image and caption lengths; bad rows become warnings."""
    from captioning import sources
    from captioning.decode import open_image

    sources.check_columns(ds, image_column, text_column, what)
    for i, row in enumerate(sources.undecoded(ds, image_column)):
        label, source = sources.image_cell(row[image_column], i)
        name = f"{what} row {i}" + (f" ({label})" if label != f"row {i}" else "")
        if source is None:
            warnings["unreadable_image"].append(f"{name}: column {image_column!r} is empty")
        else:
            try:
                image = open_image(source)
                found["width"].append(image.width)
                found["height"].append(image.height)
            except DataError as e:
                named = sources.image_label(label, source)
                name = name if named == label else f"{what} row {i} ({named})"
                warnings["unreadable_image"].append(f"{name}: {str(e).split(': ', 1)[-1]}")
        text = row[text_column]
        refs = [] if text is None else sources.caption_refs(text)
        if refs is None:
            warnings["bad_caption"].append(f"{name}: not a string or a list of strings")
            continue
        if not refs:
            warnings["empty_caption"].append(name)
        found["refs"].append(len(refs))
        found["length"].extend(count(t) for t in refs)


def stats(args):
    unit, count = caption_counter(args.model)
    train_table, eval_table, how = cli_splits(args)
    found = {"width": [], "height": [], "refs": [], "length": []}
    warnings = {"empty_caption": [], "unreadable_image": [], "bad_caption": []}
    for table, what in ((train_table, "train"), (eval_table, "eval")):
        scan_rows(table, args.image_column, args.text_column, what, count, found, warnings)
    result = {
        "dataset": args.dataset,
        "rows": {"train": len(train_table), "eval": len(eval_table), "eval_from": how},
        "captions_per_image": summary(found["refs"]),
        "caption_length": {"unit": unit, **summary(found["length"], (95,))},
        "image_width": summary(found["width"]),
        "image_height": summary(found["height"]),
        "warnings": {k: {"count": len(v), "first": v[:WARNING_NAMES]} for k, v in warnings.items() if v},
    }
    if args.json:
        print(json.dumps(result))
        return
    show = lambda s: ", ".join(f"{k} {'-' if v is None else v}" for k, v in s.items())  # noqa: E731
    length = dict(result["caption_length"])
    lines = [("dataset", args.dataset),
             ("rows", f"train {len(train_table)}, eval {len(eval_table)} ({how})"),
             ("captions per image", show(result["captions_per_image"])),
             ("caption length", f"{length.pop('unit')}: {show(length)}"),
             ("image width", show(result["image_width"])),
             ("image height", show(result["image_height"])),
             ("warnings", ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in warnings.items() if v) or "none")]
    for key, value in lines:
        print(f"{key:<20}{value}")
    for kind, v in warnings.items():
        for name in v[:WARNING_NAMES]:
            print(f"  {kind.replace('_', ' ')}: {name}")
        if len(v) > WARNING_NAMES:
            print(f"  {kind.replace('_', ' ')}: ... and {len(v) - WARNING_NAMES} more")


def main(argv=None):
    p = cli.Parser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic", help="write the synthetic captioning set as an imagefolder")
    s.add_argument("--size", type=cli.positive_int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    for name, text in (("preview", "save one row of training images titled with their captions as a PNG"),
                       ("stats", "rows per split, captions per image, caption lengths, image sizes, bad rows")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--dataset", required=True, help="Hub dataset id, imagefolder folder, save_to_disk folder, "
                                                        "COCO or Karpathy caption file (.json), or 'synthetic'")
        c.add_argument("--image-column", default="image")
        c.add_argument("--text-column", default="text")
        c.add_argument("--image-root", default=None,
                       help="folder the image paths of a caption file are relative to (default: the file's folder)")
        c.add_argument("--eval-split", default=None,
                       help="the source's split to show as eval (e.g. test of a Karpathy file; default: its "
                            "validation/valid/val/test split, else one cut from train)")
        c.add_argument("--seed", type=int, default=42, help="the split seed (as train.py --seed)")
        c.add_argument("--test-size", type=cli.fraction, default=0.1, help="held-out fraction (as train.py)")
        c.add_argument("--synthetic-size", type=cli.positive_int, default=1000, help="scenes in --dataset synthetic")
        if name == "preview":
            c.add_argument("--n", type=cli.positive_int, default=5, help="images in the row")
            c.add_argument("--out", default="samples.png")
        else:
            c.add_argument("--model", default="tiny",
                           help="count caption tokens with this model's tokenizer (folder or Hub id); "
                                "'tiny' (default): whitespace words")
            c.add_argument("--json", action="store_true", help="one JSON object instead of text lines")
    args = p.parse_args(argv)
    if args.cmd == "synthetic":
        import datasets

        from captioning import sources, synthetic

        datasets.disable_progress_bars()
        sources.write_imagefolder(synthetic.dataset(args.size, args.seed), args.out)
        print(f"wrote {args.size} images and metadata.jsonl to {args.out}")
        return 0
    try:
        (preview if args.cmd == "preview" else stats)(args)
    except DataError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
