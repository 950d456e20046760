"""Turn a captioning source into tables of images and captions (image_cache.py and batches.py make the tensors).

Sources (--dataset): a Hub dataset id, a local imagefolder (images + metadata.jsonl/csv), a folder
written by Dataset.save_to_disk, a COCO captions or Karpathy split file (.json, images under
--image-root), or `synthetic`: drawn scenes with compositional captions, generated on the fly and
deterministic by seed (synthetic.py). Every source becomes a `datasets` table with an image column
and a caption column (a string, or a list of strings for several references).

An imagefolder's metadata.jsonl/csv is read line by line before `datasets` reads it (metadata.py),
so that a bad line is reported by its number instead of as a pyarrow or pandas traceback.
"""
import json
import math
import os

import datasets
import pyarrow as pa
from huggingface_hub.errors import HfHubHTTPError

from captioning import captionfiles, decode, metadata, synthetic
from captioning.decode import MAX_IMAGE_PIXELS
from captioning.errors import DataError
from captioning.hub import looks_like_path
from captioning.presets import SYNTHETIC
from captioning.strings import normalize





EVAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


def write_imagefolder(ds, out_dir, image_column="image", text_column="text"):
    """Write a table as an HF imagefolder: PNG files plus metadata.jsonl with file_name and captions."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.jsonl"), "w") as f:
        for i, row in enumerate(ds):
            name = f"{i:06d}.png"
            row[image_column].save(os.path.join(out_dir, name))
            f.write(json.dumps({"file_name": name, text_column: row[text_column]}) + "\n")


def load_source(name, seed=0, synthetic_size=1000, image_root=None, columns=("image", "text")):
    """A DatasetDict or Dataset for --dataset. Raises DataError with a one-line reason.

    image_root: where a caption file's images are (default: the file's folder); only for caption files.
    columns: the names a caption file's image and caption columns get (other sources have their own)."""
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
    return isinstance(e, (ConnectionError, TimeoutError, FileNotFoundError, HfHubHTTPError))


def load_imagefolder(name, found):
    """An imagefolder, its metadata checked line by line first: `datasets` reports a bad line as a pyarrow or
    pandas error about a row of a block, or loads it and leaves the row without its image."""
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
    try:
        return datasets.load_from_disk(name)
    except Exception as e:
        raise DataError(damaged_saved_folder(name) or
                        f"dataset folder {name!r} (save_to_disk) could not be loaded: {first_line(e)}") from None


def damaged_saved_folder(name):
    """The first damaged or missing file of a save_to_disk folder, as a one-line reason; None when all look whole."""
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
    A reference is usable when a word is left after strings.normalize: an empty or punctuation-only one
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
        return decode.open_image(source, max_pixels=max_pixels), refs
    except DataError as e:
        raise DataError(f"{what} row {i} ({image_label(label, source)}): {str(e).split(': ', 1)[-1]}") from None
