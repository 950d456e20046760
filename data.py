"""Turn a captioning source into batches for GIT.

Sources (--dataset): a Hub dataset id, a local imagefolder (images + metadata.jsonl/csv), a folder
written by Dataset.save_to_disk, or `synthetic`: drawn scenes with compositional captions,
generated on the fly and deterministic by seed. Every source becomes a `datasets` table with an
image column and a caption column (a string, or a list of strings for several references).

Images are decoded here (not by `datasets`) so that every mode becomes RGB the same way and a bad
file is reported by name. The image processor runs once per image; epochs reuse the tensors.

    python data.py synthetic --size 500 --out scenes/   # write the synthetic set as an imagefolder
    python data.py preview --dataset scenes/ --n 5 --out samples.png   # the guide's row of captioned images
    python data.py stats --dataset scenes/                # split sizes, caption lengths, image sizes, bad rows
"""
import argparse
import functools
import io
import itertools
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from hub import looks_like_path

SYNTHETIC = "synthetic"
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


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


def open_image(source):
    """A path, bytes, or an already decoded PIL image -> RGB PIL image. Raises DataError."""
    name = source if isinstance(source, str) else "image"
    try:
        if isinstance(source, Image.Image):
            return to_rgb(source)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
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


# ---------------------------------------------------------------------------------------------
# The synthetic dataset

COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
          "yellow": (235, 200, 0), "purple": (140, 40, 170), "orange": (245, 130, 0)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the image side
PLACES = {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
          (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
          (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}


def synthetic_scene(seed, index, size=128):
    """One drawn scene and its caption; the same (seed, index) always gives the same pair."""
    rng = random.Random(seed * 1_000_003 + index)
    tint = [rng.randint(225, 255) for _ in range(3)]
    img = Image.new("RGB", (size, size), tuple(tint))
    draw = ImageDraw.Draw(img)
    cells = rng.sample(sorted(PLACES), rng.randint(1, 2))
    phrases = []
    for row, col in sorted(cells):  # caption objects in reading order, so the caption is unique
        color, shape, size_name = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice(sorted(SIZES))
        r = SIZES[size_name] * size
        cx = (col + 0.5) * size / 3 + rng.uniform(-0.04, 0.04) * size
        cy = (row + 0.5) * size / 3 + rng.uniform(-0.04, 0.04) * size
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
        elif shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=COLORS[color])
        phrases.append(f"a {size_name} {color} {shape} {PLACES[(row, col)]}")
    return img, " and ".join(phrases)


def synthetic_dataset(n, seed=0):
    import datasets

    scenes = [synthetic_scene(seed, i) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [s[0] for s in scenes], "text": [s[1] for s in scenes]},
                                      features=features)


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

def load_source(name, seed=0, synthetic_size=1000):
    """A DatasetDict or Dataset for --dataset. Raises DataError with a one-line reason."""
    import datasets

    if name == SYNTHETIC:
        return synthetic_dataset(synthetic_size, seed)
    if os.path.isdir(name):
        if any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(name)
        if any(os.path.isfile(os.path.join(name, f)) for f in ("metadata.jsonl", "metadata.csv")):
            return datasets.load_dataset("imagefolder", data_dir=name)
        raise DataError(f"dataset folder {name!r} has neither metadata.jsonl/metadata.csv (imagefolder) "
                        f"nor dataset_dict.json/state.json (save_to_disk)")
    if looks_like_path(name):
        raise DataError(f"dataset folder {name!r} does not exist")
    try:
        return datasets.load_dataset(name)
    except Exception as e:  # the Hub client raises many kinds; all mean the same thing to a user
        raise DataError(f"dataset {name!r} is not a local folder and could not be loaded from the Hugging Face "
                        f"Hub ({type(e).__name__}: offline and not cached, or no such dataset); pass an imagefolder or "
                        f"save_to_disk folder, or --dataset synthetic") from None


def split_source(source, test_size, seed):
    """Use the source's own eval split when it has one, else split train as the recipe does."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        eval_name = next((n for n in EVAL_SPLIT_NAMES if n in source), None)
        train_name = "train" if "train" in source else next(iter(source))
        if eval_name is not None and eval_name != train_name:
            return source[train_name], source[eval_name]
        source = source[train_name]
    parts = source.train_test_split(test_size=test_size, seed=seed)
    return parts["train"], parts["test"]


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
    """A caption cell -> its non-empty references, stripped; None when not a string or a list of strings."""
    refs = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
    if refs is None or not all(isinstance(t, str) for t in refs):
        return None
    return [t.strip() for t in refs if t and t.strip()]


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


def read_row(row, i, image_column, text_column, what):
    label, source = image_cell(row[image_column], i)
    if source is None:
        raise DataError(f"{what} row {i}: column {image_column!r} is empty")
    refs = caption_refs(row[text_column])
    if refs is None:
        raise DataError(f"{what} row {i}: column {text_column!r} must hold a string or a list of strings")
    if not refs:
        raise DataError(f"{what} row {i} ({label}): empty caption in column {text_column!r}")
    try:
        return open_image(source), refs
    except DataError as e:
        raise DataError(f"{what} row {i} ({label}): {str(e).split(': ', 1)[-1]}") from None


# ---------------------------------------------------------------------------------------------
# Tensors and batches

def pixel_values(image_processor, images, chunk=64):
    """Run the checkpoint's image processor once over all images: (N, 3, H, W) float32."""
    out = [image_processor(images=images[i:i + chunk], return_tensors="pt")["pixel_values"]
           for i in range(0, len(images), chunk)]
    return torch.cat(out) if out else torch.empty(0)


def to_pixels(image_processor, images):
    """PIL images -> (N, 3, H, W) uint8, resized and cropped by the checkpoint's processor but not
    yet rescaled or normalised: a quarter of float32's size. collate() normalises each batch, which
    gives the processor's own output exactly."""
    if not images:
        return np.zeros((0, 3, 1, 1), dtype=np.uint8)
    out = image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    return out if out.dtype == np.uint8 else np.clip(np.rint(out), 0, 255).astype(np.uint8)


def normaliser(image_processor):
    """(mean, std) as (3, 1, 1) tensors for uint8 pixels scaled to [0, 1]."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
    return mean, std


CACHE_VERSION = 1  # bump when what prepare_split stores changes


def cache_key(table, image_column, text_column, image_processor):
    """Names the preprocessed form of a split: the table's datasets fingerprint (content, files and
    their modification times, split arguments) and everything that shapes the pixels."""
    import hashlib

    settings = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
    ident = json.dumps([CACHE_VERSION, table._fingerprint, image_column, text_column, settings], sort_keys=True,
                       default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def prepare_split(table, image_column, text_column, what, image_processor, skipped=None, cache_dir=None, chunk=64):
    """Decode, resize and crop every image once -> (uint8 pixels (N, 3, H, W), captions).

    Images are decoded a chunk at a time, so a split of full-size photos never sits in memory
    decoded. Bad rows raise or are described in `skipped`, as in read_rows. With cache_dir the
    result is written there (pixels as a raw file, opened memory-mapped: a split larger than memory
    is fine) and the next run with the same data and processor starts from it without decoding."""
    check_columns(table, image_column, text_column, what)
    folder = os.path.join(cache_dir, f"{what}-{cache_key(table, image_column, text_column, image_processor)}") \
        if cache_dir else None

    def from_cache():
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        if index["skipped"] and skipped is None:
            raise DataError(index["skipped"][0])
        if skipped is not None:
            skipped.extend(index["skipped"])
        shape = tuple(index["shape"])
        pixels = np.memmap(os.path.join(folder, "pixels.u8"), dtype=np.uint8, mode="r", shape=shape) \
            if shape[0] else np.zeros(shape, dtype=np.uint8)
        return pixels, index["captions"]

    if folder and os.path.isfile(os.path.join(folder, "index.json")):
        return from_cache()

    tmp = f"{folder}.tmp-{os.getpid()}" if folder else None
    if tmp:
        os.makedirs(tmp, exist_ok=True)
    chunks, captions, pending, bad = [], [], [], []
    out = open(os.path.join(tmp, "pixels.u8"), "wb") if tmp else None
    shape = None
    try:
        def flush():
            nonlocal shape
            if pending:
                block = to_pixels(image_processor, pending)
                shape = block.shape[1:]
                out.write(block.tobytes()) if out else chunks.append(block)
                pending.clear()

        for image, refs in good_rows(table, image_column, text_column, what, None if skipped is None else bad):
            pending.append(image)
            captions.append(refs)
            if len(pending) == chunk:
                flush()
        flush()
        full_shape = (len(captions), *(shape or (3, 1, 1)))
        if out:
            out.close()
            with open(os.path.join(tmp, "index.json"), "w") as f:
                json.dump({"shape": full_shape, "captions": captions, "skipped": bad}, f)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)  # complete, or not there at all
    except BaseException:
        if out:
            out.close()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder:
        return from_cache()
    if skipped is not None:
        skipped.extend(bad)
    return (np.concatenate(chunks) if chunks else np.zeros(full_shape, dtype=np.uint8)), captions


class CaptionDataset(torch.utils.data.Dataset):
    """Images (uint8, model resolution, possibly memory-mapped from the cache) with tokenised
    captions. With several captions per image, training draws one per epoch, seeded by
    (seed, epoch, index) so a resumed run draws the same ones."""

    def __init__(self, pixels, token_ids, references, seed=0, normalise=None):
        self.pixels, self.token_ids, self.references, self.seed = pixels, token_ids, references, seed
        self.mean, self.std = normalise if normalise else (torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
        self.epoch = None  # None: always the first caption (evaluation)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.token_ids)

    def __getitem__(self, i):
        choices = self.token_ids[i]
        k = 0
        if self.epoch is not None and len(choices) > 1:
            k = int(np.random.default_rng([self.seed, self.epoch, i]).integers(len(choices)))
        return torch.from_numpy(np.array(self.pixels[i])), choices[k], i


def tokenise(tokenizer, captions, max_text_length):
    """Each image's references -> a list of token id lists, truncated to max_text_length."""
    flat = [c for refs in captions for c in refs]
    ids = tokenizer(flat, truncation=True, max_length=max_text_length)["input_ids"] if flat else []
    token_ids, k = [], 0
    for refs in captions:
        token_ids.append(ids[k:k + len(refs)])
        k += len(refs)
    return token_ids


def build_dataset(images, captions, processor, max_text_length, seed=0):
    """From decoded images (PIL) or from uint8 pixels made by prepare_split."""
    pixels = images if isinstance(images, np.ndarray) else to_pixels(processor.image_processor, images)
    return CaptionDataset(pixels, tokenise(processor.tokenizer, captions, max_text_length), captions, seed,
                          normaliser(processor.image_processor))


def collate(batch, pad_id=0, mean=0.0, std=1.0):
    """Pad captions to the longest in the batch. Labels are the input ids with padding set to -100
    so the loss ignores it (the recipe trains on 512-token padding). uint8 pixels become floats
    scaled to [0, 1] and normalised, as the image processor would have."""
    pixels, ids, index = zip(*batch)
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        attention_mask[row, :len(x)] = 1
    pixels = torch.stack(pixels)
    if pixels.dtype == torch.uint8:
        pixels = (pixels.float() / 255 - mean) / std
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100), "index": torch.tensor(index)}


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """torch's DistributedSampler (a seeded shuffle per epoch, this rank's share of it) that can
    also start part-way through its share, for resume. With num_replicas=1 it is a plain seeded
    shuffle, so one process and N ranks draw from the same permutation."""

    def __init__(self, n, seed=0, shuffle=True, num_replicas=1, rank=0):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation: rank r takes items r, r + N, r + 2N... in order, without the padding
    DistributedSampler adds, so every eval image is scored exactly once across ranks."""

    def __init__(self, n, num_replicas=1, rank=0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loader(dataset, batch_size, sampler, pad_id, num_workers=0, pin_memory=False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=functools.partial(collate, pad_id=pad_id, mean=getattr(dataset, "mean", 0.0),
                                     std=getattr(dataset, "std", 1.0)),
        generator=torch.Generator())


def epoch_batches(loader, epoch, start=0, seed=0):
    """An iterator over the batches of `epoch`, from sample `start` of this rank's share on.

    Everything random in it is a function of (seed, epoch): the shuffle, the caption drawn for
    images with several, and the worker seeds. A DataLoader draws its worker seed from its
    generator at every new iterator, so without the reseed a resumed run (one fresh iterator
    instead of one per earlier epoch) would give its workers other seeds."""
    loader.sampler.set_epoch(epoch, start)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)
    return iter(loader)


# ---------------------------------------------------------------------------------------------
# Command line: synthetic, preview, stats

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def cli_splits(args):
    """(train table, eval table, how the eval split was made) as train.py's load_tables gets them."""
    if args.dataset != SYNTHETIC:
        from hub import offline_unless_needed

        offline_unless_needed(args.dataset)  # before datasets is imported
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    source = load_source(args.dataset, seed=args.seed, synthetic_size=args.synthetic_size)
    own = isinstance(source, datasets.DatasetDict) and any(
        n in source and n != ("train" if "train" in source else next(iter(source))) for n in EVAL_SPLIT_NAMES)
    train_table, eval_table = split_source(source, args.test_size, args.seed)
    how = "the source's own eval split" if own else f"split from train, test-size {args.test_size}, seed {args.seed}"
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic", help="write the synthetic captioning set as an imagefolder")
    s.add_argument("--size", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    for name, text in (("preview", "save one row of training images titled with their captions as a PNG"),
                       ("stats", "rows per split, captions per image, caption lengths, image sizes, bad rows")):
        c = sub.add_parser(name, help=text, description=text)
        c.add_argument("--dataset", required=True, help="Hub dataset id, imagefolder folder, save_to_disk folder, or 'synthetic'")
        c.add_argument("--image-column", default="image")
        c.add_argument("--text-column", default="text")
        c.add_argument("--seed", type=int, default=42, help="the split seed (as train.py --seed)")
        c.add_argument("--test-size", type=float, default=0.1, help="held-out fraction (as train.py)")
        c.add_argument("--synthetic-size", type=int, default=1000, help="scenes in --dataset synthetic")
        if name == "preview":
            c.add_argument("--n", type=int, default=5, help="images in the row")
            c.add_argument("--out", default="samples.png")
        else:
            c.add_argument("--model", default="tiny",
                           help="count caption tokens with this model's tokenizer (folder or Hub id); "
                                "'tiny' (default): whitespace words")
            c.add_argument("--json", action="store_true", help="one JSON object instead of text lines")
    args = p.parse_args(argv)
    if args.cmd == "synthetic":
        if args.size <= 0:
            p.error("--size must be positive")
        import datasets

        datasets.disable_progress_bars()
        write_imagefolder(synthetic_dataset(args.size, args.seed), args.out)
        print(f"wrote {args.size} images and metadata.jsonl to {args.out}")
        return 0
    if not 0 < args.test_size < 1:
        p.error("--test-size must be between 0 and 1")
    if args.synthetic_size <= 0:
        p.error("--synthetic-size must be positive")
    if args.cmd == "preview" and args.n <= 0:
        p.error("--n must be positive")
    try:
        (preview if args.cmd == "preview" else stats)(args)
    except DataError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
