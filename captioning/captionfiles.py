"""COCO captions and Karpathy split files (--dataset captions.json) -> tables of image paths and captions.

metadata.py reads and checks the file entry by entry; this builds the `datasets` tables from what it
read, with fingerprints that change when the file or an image changes, so the image cache stays true.
"""
import contextlib
import gc
import hashlib
import json
import os

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from captioning import metadata
from captioning.errors import DataError



def is_caption_file(name):
    return name.lower().endswith(".json") and not os.path.isdir(name)


CAPTION_TABLE_VERSION = 1  # bump when the tables built from a caption file change for the same file


def load_caption_file(path, image_root=None, columns=("image", "text")):
    """A COCO captions file -> one table (it has no splits: the eval rows are cut from it by --test-size);
    a Karpathy split file -> a DatasetDict of its own splits: train (its train and restval images), val and
    test, those with images. Each row: an image path (image_root/file_name, or image_root/filepath/filename)
    and its captions, as a list. The images are not opened here: a missing one is a bad row, as in an
    imagefolder, named with the entry (`images[12]`) that names it."""
    image_column, text_column = columns
    if image_column == text_column:
        raise DataError(f"--image-column and --text-column are both {image_column!r}: the table of a caption file "
                        f"has an image column and a caption column")
    if image_root is not None and not os.path.isdir(image_root):
        raise DataError(f"--image-root {image_root!r} is not a folder")
    root = os.path.abspath(os.path.dirname(path) if image_root is None else image_root)
    with gc_paused():
        return caption_tables(path, root, columns)


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection for a while. Parsing a caption file makes millions of objects and no cycles;
    each collection the allocations set off walks all of them: with it, a 144 MB Karpathy file took 3.7 s to
    load, without it 1.6 s."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def caption_tables(path, root, columns):
    """load_caption_file's tables, the images under `root`."""
    kind, names, refs, splits = metadata.read_caption_file(path)
    prefix = os.path.join(root, "")
    paths = [prefix + name for name in names]
    stamps = image_stamps(paths, path)
    if splits is None:
        return caption_table([kind], paths, refs, stamps, columns)
    rows = {name: [i for i, s in enumerate(splits) if s == name] for name in ("train", "val", "test")}
    if not rows["train"]:
        raise DataError(f"{path}: no image has split \"train\" or \"restval\" (the images to train on); "
                        f"splits found: {', '.join(sorted(set(splits)))}")
    return datasets.DatasetDict({
        name: caption_table([kind, name], [paths[i] for i in idx], [refs[i] for i in idx], [stamps[i] for i in idx],
                            columns)
        for name, idx in rows.items() if idx})


def image_stamps(paths, shown):
    """Each image file's modification time and size, or None when it is missing (noted for read_row's message).
    They go into the tables' fingerprints, as an imagefolder's do: an image changed in place is decoded
    again, not read from the cache."""
    stamps = []
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
            stamps.append(f"{st.st_mtime_ns} {st.st_size}")
        except OSError:
            stamps.append(None)
            metadata.missing_images[os.path.realpath(path)] = f"in {shown} images[{i}]"
    return stamps


def caption_table(identity, paths, refs, stamps, columns):
    """A table of image paths (an undecoded Image column, as an imagefolder's) and lists of captions. Its
    fingerprint, which names its cache entry, is a hash of everything in it and of the images' stamps."""
    digest = hashlib.sha256(json.dumps([CAPTION_TABLE_VERSION, *identity, len(paths)]).encode())
    for part in ("\0".join(paths), "\0".join(map(str, stamps)), "\0".join(map("\x1f".join, refs))):
        digest.update(part.encode("utf-8", "surrogatepass"))
    image = pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                       names=["bytes", "path"])
    table = pa.table({columns[0]: image, columns[1]: pa.array(refs, pa.list_(pa.string()))})
    features = datasets.Features({columns[0]: datasets.Image(),
                                  columns[1]: datasets.List(datasets.Value("string"))})
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                            fingerprint=digest.hexdigest()[:16])
