"""Turn a captioning source into tables of images and captions (batches.py makes the tensors).

Sources (--dataset): a Hub dataset id, a local imagefolder (images + metadata.jsonl/csv), a folder
written by Dataset.save_to_disk, a COCO captions or Karpathy split file (.json, images under
--image-root), or `synthetic`: drawn scenes with compositional captions, generated on the fly and
deterministic by seed (synthetic.py). Every source becomes a `datasets` table with an image column
and a caption column (a string, or a list of strings for several references).

Images are decoded here (not by `datasets`) so that every mode becomes RGB the same way and a bad
file is reported by name. An imagefolder's metadata.jsonl/csv is read line by line before `datasets`
reads it, so that a bad line is reported by its number instead of as a pyarrow or pandas traceback.

    python data.py synthetic --size 500 --out scenes/   # write the synthetic set as an imagefolder
    python data.py preview --dataset scenes/ --n 5 --out samples.png   # the guide's row of captioned images
    python data.py stats --dataset scenes/                # split sizes, caption lengths, image sizes, bad rows
"""
import contextlib
import io
import json
import math
import os
import stat
import sys

import numpy as np
from PIL import Image, ImageOps

import captionfiles
import cli
import metadata
import synthetic
from cli import fail
from hub import looks_like_path
from metrics import normalize

SYNTHETIC = "synthetic"
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")
# --max-image-pixels: an image that would decode to more pixels than this is refused before it is
# decoded. A 12000 x 12000 PNG of 140 KB took 2.4 GB to decode in each process; 40 Mpx of RGB is
# 120 MB. A JPEG counts at the size it is drafted to (see open_image), so a 200 Mpx photo, decoded
# at 1/8, passes. PIL's own limit (a warning at 89 Mpx, an error at 179) gives way to this one.
MAX_IMAGE_PIXELS = cli.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None
FILE_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
              stat.S_ISSOCK: "a socket"}


class DataError(Exception):
    """Bad data a user can fix; the message names the file, row or column."""


# ---------------------------------------------------------------------------------------------
# Images

def to_rgb(img):
    """Any PIL image -> RGB, upright (EXIF orientation applied), transparency over white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: a plain convert("L") clips everything above 255 to white.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def open_image(source, draft=None, max_pixels=MAX_IMAGE_PIXELS):
    """A path, bytes, or an already decoded PIL image -> RGB PIL image. Raises DataError.

    draft: the shortest edge the caller will resize to. A JPEG far larger than that is then
    decoded at 1/2, 1/4 or 1/8 of its size by the JPEG decoder itself (PIL's Image.draft), never
    below `draft` pixels on either side: several times faster than decoding every pixel and
    throwing most of them away in the resize.
    max_pixels: refuse an image that would decode to more pixels than this (None or 0: any size).
    A path is read only if it is a regular file: a FIFO or a device would block the read forever."""
    name = source if isinstance(source, str) else "image"
    try:
        if isinstance(source, Image.Image):
            return to_rgb(source)
        with contextlib.closing(io.BytesIO(source) if isinstance(source, bytes) else regular_file(source)) as f, \
                Image.open(f) as img:  # PIL leaves a file object it is given open
            stored = img.size
            if draft and img.format == "JPEG":
                img.draft(None, (draft, draft))
            if max_pixels and img.width * img.height > max_pixels:
                raise DataError(f"{name}: refused, too many pixels: {stored[0]} x {stored[1]} is "
                                f"{stored[0] * stored[1] / 1e6:.1f} Mpx"
                                + (f" (decoded at {img.width} x {img.height})" if img.size != stored else "")
                                + f", over --max-image-pixels {max_pixels:,}")
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, not an image") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: refused, too many pixels ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{name}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def regular_file(path):
    """The file at path opened for reading, if it is a regular file; DataError naming what it is if not.
    Opened without blocking and then looked at, so that a FIFO with no writer cannot hold the open."""
    f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))  # f.name: PIL's messages
    mode = os.fstat(f.fileno()).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        kind = next((what for test, what in FILE_KINDS.items() if test(mode)), "not a regular file")
        raise DataError(f"{path}: {kind}, not an image file; only regular files are read")
    return f


def draft_size(image_processor):
    """The shortest edge an image processor resizes to (CLIP-style `shortest_edge`, or the smaller
    of height and width), for open_image's draft; None when it cannot be told."""
    size = image_processor.to_dict().get("size") or {}
    size = size if isinstance(size, dict) else {"shortest_edge": size}
    if size.get("shortest_edge"):
        return int(size["shortest_edge"])
    if size.get("height") and size.get("width"):
        return int(min(size["height"], size["width"]))
    return None


# ---------------------------------------------------------------------------------------------
# Tables to disk

def write_imagefolder(ds, out_dir, image_column="image", text_column="text"):
    """Write a table as an HF imagefolder: PNG files plus metadata.jsonl with file_name and captions."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
        for i, row in enumerate(ds):
            name = f"{i:06d}.png"
            row[image_column].save(os.path.join(out_dir, name))
            f.write(json.dumps({"file_name": name, text_column: row[text_column]}) + "\n")


# ---------------------------------------------------------------------------------------------
# Sources -> (train table, eval table)

def load_source(name, seed=0, synthetic_size=1000, image_root=None, columns=("image", "text")):
    """A DatasetDict or Dataset for --dataset. Raises DataError with a one-line reason.

    image_root: where a caption file's images are (default: the file's folder); only for caption files.
    columns: the names a caption file's image and caption columns get (other sources have their own)."""
    import datasets

    if captionfiles.is_caption_file(name):
        if not os.path.isfile(name):
            raise DataError(f"caption file {name!r} does not exist")
        return captionfiles.load_caption_file(name, image_root, columns)
    if image_root is not None:
        raise DataError(f"--image-root is for a COCO or Karpathy caption file (.json); --dataset {name!r} is not one")
    if name == SYNTHETIC:
        return synthetic.dataset(synthetic_size, seed)
    if os.path.isdir(name):
        if any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            return load_saved(name)
        found = metadata.metadata_files(name)
        if found:
            return load_imagefolder(name, found)
        if os.path.isfile(os.path.join(name, "dataset_info.json")):  # a save_to_disk folder that lost its state.json
            return load_saved(name)
        raise DataError(f"dataset folder {name!r} has neither metadata.jsonl/metadata.csv (imagefolder) "
                        f"nor dataset_dict.json/state.json (save_to_disk)")
    if os.path.exists(name):
        raise DataError(f"--dataset {name!r} is a file; give the folder that holds the images and metadata.jsonl/csv, "
                        f"or a COCO or Karpathy caption file (.json)")
    if looks_like_path(name):
        raise DataError(f"dataset folder {name!r} does not exist")
    try:
        return datasets.load_dataset(name)
    except Exception as e:  # the Hub client raises many kinds
        if unreachable(e):
            raise DataError(f"dataset {name!r} is not a local folder and could not be loaded from the Hugging Face "
                            f"Hub ({type(e).__name__}: offline and not cached, or no such dataset); pass an "
                            f"imagefolder or save_to_disk folder, or --dataset synthetic") from None
        # reached and found, but unreadable: a damaged cache, a format `datasets` cannot read
        raise DataError(f"dataset {name!r} (Hugging Face Hub) could not be loaded: {first_line(e)}") from None


def first_line(e, limit=200):
    """An exception as one line: its type and the first line of its message, cut at `limit` characters."""
    text = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[0] if len(text[0]) <= limit else text[0][:limit] + '...'}"


def unreachable(e):
    """Whether a Hub load failed for want of the dataset (offline, not cached, no such id), not for its content."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(e, (ConnectionError, TimeoutError, FileNotFoundError, HfHubHTTPError))


def load_imagefolder(name, found):
    """An imagefolder, its metadata checked line by line first: `datasets` reports a bad line as a pyarrow or
    pandas error about a row of a block, or loads it and leaves the row without its image."""
    import datasets

    if len({os.path.basename(f) for f in found}) > 1:
        raise DataError(f"dataset folder {name!r} has both metadata.jsonl and metadata.csv files; keep one kind")
    columns = set()
    for path in found:
        columns.update(metadata.check_metadata(path, os.path.join(name, os.path.relpath(path, name))))

    def unread(source):
        return sorted(columns - set.intersection(*(set(split.column_names) for split in source.values())))

    try:
        source = datasets.load_dataset("imagefolder", data_dir=name)
        if unread(source) and found == [os.path.join(name, os.path.basename(found[0]))]:
            # `datasets` takes train/test/val in file or folder names (COCO_train2014_000000.jpg) for split
            # names, then reads only the metadata files inside a split: a top-level metadata file naming every
            # image was ignored. Read as one split, the folder is what its metadata says.
            source = datasets.load_dataset("imagefolder", data_dir=name, data_files={"train": ["**"]})
    except Exception as e:  # what the checks above did not foresee still gets one line
        raise DataError(f"dataset folder {name!r} (imagefolder) could not be loaded: {first_line(e)}") from None
    if unread(source):
        raise DataError(f"dataset folder {name!r}: `datasets` did not read the column(s) {', '.join(unread(source))} "
                        f"of its metadata: it takes train/test/val in file and folder names for splits and reads "
                        f"only the metadata files inside a split; put each split's metadata file in its folder")
    return source


def load_saved(name):
    """A save_to_disk folder; when `datasets` cannot load it, the file that is damaged is named if it can be told."""
    import datasets

    try:
        return datasets.load_from_disk(name)
    except Exception as e:
        raise DataError(damaged_saved_folder(name) or
                        f"dataset folder {name!r} (save_to_disk) could not be loaded: {first_line(e)}") from None


def damaged_saved_folder(name):
    """The first damaged or missing file of a save_to_disk folder, as a one-line reason; None when all look whole."""
    import pyarrow as pa

    def read_json(path):
        shown = os.path.join(name, os.path.relpath(path, name))
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f), None
        except FileNotFoundError:
            return None, f"{shown} is missing: the save_to_disk folder is incomplete"
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{shown}: {getattr(e, 'strerror', None) or e}"
        except json.JSONDecodeError as e:
            return None, (f"{shown}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                          f"the save_to_disk folder is damaged")

    splits = [""]
    if os.path.isfile(os.path.join(name, "dataset_dict.json")):
        listing, problem = read_json(os.path.join(name, "dataset_dict.json"))
        if problem:
            return problem
        if not isinstance(listing, dict) or not isinstance(listing.get("splits"), list):
            return f"{os.path.join(name, 'dataset_dict.json')}: no \"splits\" list; the save_to_disk folder is damaged"
        splits = [str(s) for s in listing["splits"]]
    for split in splits:
        folder = os.path.join(name, split)
        for part in ("dataset_info.json", "state.json"):
            state, problem = read_json(os.path.join(folder, part))
            if problem:
                return problem
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
            return (f"{os.path.join(folder, 'state.json')}: no \"_data_files\" list of file names; "
                    f"the save_to_disk folder is damaged")
        for f in files:
            path = os.path.join(folder, str(f["filename"]))
            if not os.path.isfile(path):
                return f"{path} is missing (named in {os.path.join(folder, 'state.json')})"
            try:
                with pa.memory_map(path) as source:
                    pa.ipc.open_stream(source).read_all()
            except (OSError, pa.ArrowException) as e:
                return f"{path}: not a whole Arrow file ({first_line(e)}); the save_to_disk folder is damaged"
    return None


def split_names(source, eval_split=None):
    """(train split name, eval split name) of a source; the eval name is None when the eval rows are to be
    cut from train. eval_split picks a split by name (Karpathy's test instead of val); by default the
    source's own validation/valid/val/test split, in that order."""
    import datasets

    if not isinstance(source, datasets.DatasetDict):
        if eval_split:
            raise DataError(f"--eval-split {eval_split!r}: the dataset has no named splits (its eval rows are cut "
                            f"from it by --test-size)")
        return None, None
    train_name = "train" if "train" in source else next(iter(source))
    if eval_split:
        if eval_split not in source or eval_split == train_name:
            raise DataError(f"--eval-split {eval_split!r}: the dataset has no such split besides the one trained on "
                            f"({train_name!r}); its splits are: {', '.join(source)}")
        return train_name, eval_split
    eval_name = next((n for n in EVAL_SPLIT_NAMES if n in source), None)
    return train_name, eval_name if eval_name != train_name else None


def split_source(source, test_size, seed, eval_split=None):
    """Use the source's own eval split when it has one (or the one eval_split names), else split train as
    the recipe does."""
    train_name, eval_name = split_names(source, eval_split)
    if eval_name is not None:
        for name in (train_name, eval_name):
            if len(source[name]) == 0:
                raise DataError(f"the dataset's {name!r} split has no rows")
        return source[train_name], source[eval_name]
    if train_name is not None:
        source = source[train_name]
    n = len(source)
    held_out = math.ceil(test_size * n)  # as train_test_split counts it
    if held_out < 1 or n - held_out < 1:
        need = max(2, math.floor(1 / (1 - test_size)) - 1)
        while need - math.ceil(test_size * need) < 1:
            need += 1
        raise DataError(f"{n} row{'s' * (n != 1)} cannot be split into train and eval with --test-size {test_size} "
                        f"({n - held_out} to train on, {held_out} to evaluate): that needs at least {need} rows, "
                        f"or a source with its own validation split")
    parts = source.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]


def load_tables(args):
    """(train table, eval table) of args.dataset, images not yet decoded, the columns checked;
    raises DataError. Takes train.py's flags (dataset, seed, synthetic_size, test_size, columns, and
    image_root and eval_split when it has them)."""
    train_table, eval_table = split_source(source_of(args), args.test_size, args.seed,
                                           getattr(args, "eval_split", None))
    check_columns(train_table, args.image_column, args.text_column, "train")
    check_columns(eval_table, args.image_column, args.text_column, "eval")
    return train_table, eval_table


def source_of(args):
    """load_source for a command line's flags (train.py's, data.py's, metrics.py's)."""
    return load_source(args.dataset, seed=args.seed, synthetic_size=args.synthetic_size,
                       image_root=getattr(args, "image_root", None), columns=(args.image_column, args.text_column))


def check_columns(ds, image_column, text_column, what):
    for col in (image_column, text_column):
        if col not in ds.column_names:
            flag = "--image-column" if col == image_column else "--text-column"
            raise DataError(f"{what} split has no column {col!r} ({flag}); columns are: {', '.join(ds.column_names)}")


def undecoded(ds, image_column):
    """The table with its Image column left as bytes/paths, so that open_image decodes (and names) each file."""
    import datasets

    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def image_cell(value, i):
    """An image cell -> (label naming it, source for open_image or None when the cell is empty)."""
    if isinstance(value, dict):  # an undecoded Image cell: bytes and/or path
        return value.get("path") or f"row {i}", value["bytes"] if value.get("bytes") else value.get("path")
    return (value if isinstance(value, str) else f"row {i}"), value


def caption_refs(text):
    """A caption cell -> its usable references, stripped; None when not a string or a list of strings.
    A reference is usable when a word is left after metrics.normalize: an empty or punctuation-only one
    ("...", "!!!") would be an empty reference at evaluation, so it is dropped, and a row left with none is
    a bad row."""
    refs = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if refs is None or not all(isinstance(t, str) for t in refs):
        return None
    return [t.strip() for t in refs if normalize(t)]


def no_caption(text, text_column):
    """Why a caption cell that caption_refs found no usable reference in is bad, in words."""
    refs = [text] if isinstance(text, str) else list(text or [])
    if isinstance(text, (list, tuple)) and not refs:
        return f"no caption: column {text_column!r} holds an empty list (in a COCO file: an image without annotations)"
    shown = next((t.strip() for t in refs if t.strip()), None)
    if shown is None:
        return f"empty caption in column {text_column!r}"
    return f"caption {shown[:40]!r} in column {text_column!r} has no words (only punctuation or symbols)"


def image_label(label, source):
    """The label of an image cell, with the metadata line that names it when the file is missing."""
    named = metadata.missing_images.get(os.path.realpath(source)) if isinstance(source, str) and metadata.missing_images else None
    return f"{label}, named {named}" if named else label


def caption_texts(ds, text_column):
    """Every caption of a table, without decoding an image (to learn a tokenizer from)."""
    return [c for refs in map(caption_refs, list(ds[text_column])) if refs for c in refs]


def read_rows(ds, image_column, text_column, what, skipped=None):
    """Decode every image to RGB and every caption to a list of strings. A bad row raises a
    DataError naming it, or, when a `skipped` list is given, is left out and described there."""
    images, captions = [], []
    for image, refs in good_rows(ds, image_column, text_column, what, skipped):
        images.append(image)
        captions.append(refs)
    return images, captions


def good_rows(ds, image_column, text_column, what, skipped=None):
    """(RGB image, references) for each readable row, one at a time; bad rows raise, or are
    described in `skipped` when it is a list."""
    check_columns(ds, image_column, text_column, what)
    for i, row in enumerate(undecoded(ds, image_column)):
        try:
            yield read_row(row, i, image_column, text_column, what)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))


def read_row(row, i, image_column, text_column, what, max_pixels=MAX_IMAGE_PIXELS):
    label, source = image_cell(row[image_column], i)
    if source is None:
        raise DataError(f"{what} row {i}: column {image_column!r} is empty")
    refs = caption_refs(row[text_column])
    if refs is None:
        raise DataError(f"{what} row {i}: column {text_column!r} must hold a string or a list of strings")
    if not refs:
        raise DataError(f"{what} row {i} ({label}): {no_caption(row[text_column], text_column)}")
    try:
        return open_image(source, max_pixels=max_pixels), refs
    except DataError as e:
        raise DataError(f"{what} row {i} ({image_label(label, source)}): {str(e).split(': ', 1)[-1]}") from None


# ---------------------------------------------------------------------------------------------
# Command line: synthetic, preview, stats

def cli_splits(args):
    """(train table, eval table, how the eval split was made) as train.py's load_tables gets them."""
    if args.dataset != SYNTHETIC:
        from hub import offline_unless_needed

        offline_unless_needed(args.dataset)  # before datasets is imported
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    source = source_of(args)
    train_table, eval_table = split_source(source, args.test_size, args.seed, args.eval_split)
    _, own = split_names(source, args.eval_split)
    how = f"the source's own {own!r} split" if own else \
        f"split from train, test-size {args.test_size}, seed {args.seed}"
    return train_table, eval_table, how


def preview(args):
    """The HF captioning guide's plot_images: one row of training images titled with their captions."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        fail(f"--out {args.out!r}: folder {out_dir!r} does not exist")
    train_table, _, _ = cli_splits(args)
    check_columns(train_table, args.image_column, args.text_column, "train")
    n = min(args.n, len(train_table))
    if n == 0:
        fail(f"dataset {args.dataset!r} has no training rows to preview")
    images, captions = read_rows(train_table.select(range(n)), args.image_column, args.text_column, "train")
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
    from model import is_tiny

    if is_tiny(model):
        return "words (whitespace)", lambda text: len(text.split())
    from hub import looks_like_path, offline_unless_needed

    if looks_like_path(model) and not os.path.isdir(model):
        fail(f"--model folder {model!r} does not exist")
    offline_unless_needed(model)
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
    keys = ["min", "median", *[f"p{q}" for q in percentiles], "max"]
    if not values:
        return dict.fromkeys(keys)
    arr = np.asarray(values, dtype=np.float64)
    out = [arr.min(), np.median(arr), *[np.percentile(arr, q) for q in percentiles], arr.max()]
    return {k: (int(v) if float(v).is_integer() else round(float(v), 2)) for k, v in zip(keys, out)}


def scan_rows(ds, image_column, text_column, what, count, found, warnings):
    """A tolerant read_rows: image sizes, references per image and caption lengths; bad rows become warnings."""
    check_columns(ds, image_column, text_column, what)
    for i, row in enumerate(undecoded(ds, image_column)):
        label, source = image_cell(row[image_column], i)
        name = f"{what} row {i}" + (f" ({label})" if label != f"row {i}" else "")
        if source is None:
            warnings["unreadable_image"].append(f"{name}: column {image_column!r} is empty")
        else:
            try:
                image = open_image(source)
                found["width"].append(image.width)
                found["height"].append(image.height)
            except DataError as e:
                named = image_label(label, source)
                name = name if named == label else f"{what} row {i} ({named})"
                warnings["unreadable_image"].append(f"{name}: {str(e).split(': ', 1)[-1]}")
        text = row[text_column]
        refs = [] if text is None else caption_refs(text)
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

        datasets.disable_progress_bars()
        write_imagefolder(synthetic.dataset(args.size, args.seed), args.out)
        print(f"wrote {args.size} images and metadata.jsonl to {args.out}")
        return 0
    try:
        (preview if args.cmd == "preview" else stats)(args)
    except DataError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: metadata.py raises `data.DataError`, which
    # must be the class main() catches.
    import data

    sys.exit(data.main())
