"""The files that name images and their captions, checked before anything is built from them.

An imagefolder's metadata.jsonl / metadata.csv is checked line by line before `datasets` reads it:
`datasets` reports a bad line as a pyarrow or pandas error about a row of a block, or loads it and
leaves the row without its image. A COCO captions file or a Karpathy split file is read here into
image paths, captions and splits. Each problem is a data.DataError naming the file and line or entry.
"""
import csv
import io
import json
import os
import re

from captioning.errors import DataError



METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# Image files a metadata line or caption file entry names but that do not exist: real path -> where it is named
# ("on FILE line N", "in FILE images[N]"). Such a row is a bad row (skipped or named by --on-bad-sample, like an
# unreadable image); this tells read_row which line or entry it came from.
missing_images = {}


def metadata_files(folder):
    """The metadata files `datasets` reads in an imagefolder: at its top, or in split sub-folders (train/, ...)."""
    found = []
    with os.scandir(folder) as entries:
        subs = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith((".", "__")))
    for where in [folder, *subs]:
        found += [os.path.join(where, n) for n in METADATA_NAMES if os.path.isfile(os.path.join(where, n))]
    return found


def read_text(path, shown):
    """A whole file as text; DataError naming `shown` (and the line) when it cannot be read or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{shown}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line, line_start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{shown} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                             f"{e.start - line_start + 1}); save it as UTF-8") from None


def check_metadata(path, shown):
    """Check a metadata.jsonl/csv as `datasets` will read it: UTF-8, one JSON object per line (or CSV records
    with the header's number of fields), a file name on every row, a column's type the same on every line.
    Raises DataError naming `shown` and the line; notes the rows whose image file is missing. Returns the
    columns besides the file names (those holding a value somewhere), which the loaded table must have."""
    text = read_text(path, shown)
    images = ImageFiles(os.path.dirname(path), shown)
    rows, columns = (jsonl_rows if path.endswith(".jsonl") else csv_rows)(text, shown, images.check)
    if not rows:
        raise DataError(f"{shown} has no rows: an imagefolder needs one line per image, with its file_name and caption")
    return columns


def is_file_key(key):
    """The columns `datasets` turns into images: file_name, *_file_name, file_names, *_file_names."""
    return key in ("file_name", "file_names") or key.endswith(("_file_name", "_file_names"))


def jsonl_rows(text, shown, check_image):
    """Check each line of a metadata.jsonl and the file name on it; (rows, columns). DataError naming a bad line."""
    decode = json.JSONDecoder().decode
    kind_of, line_of = {}, {}  # column -> its JSON type, and the line that set it: pyarrow wants one type per column
    file_keys, rows = None, 0
    for number, line in enumerate(text.split("\n"), 1):
        if not line or line.isspace():
            continue
        try:
            row = decode(line)
        except ValueError as e:
            raise DataError(f"{shown} line {number}: not valid JSON ({e.msg}: column {e.colno})") from None
        if row.__class__ is not dict:
            raise DataError(f"{shown} line {number}: not a JSON object ({{...}}) but {json_kind(row)}")
        # Only an escape makes a lone surrogate (the text was decoded as strict UTF-8), and surrogate escapes are
        # \ud800-\udfff: a file json.dumps wrote with ensure_ascii has \u00e9 on every line, not worth a look.
        if "\\ud" in line or "\\uD" in line:
            check_surrogates(row, shown, number)
        if file_keys is None:
            file_keys = [k for k in row if is_file_key(k)] or ["file_name"]
        for key, value in row.items():
            kind = "a string" if value.__class__ is str else json_kind(value)
            seen = kind_of.get(key)
            if kind == seen or kind is None:
                continue
            if kind.startswith("a list mixing"):
                raise DataError(f"{shown} line {number}: {key!r} is {kind}; a column holds one type")
            if seen is None or seen == "a list" and kind.startswith("a list"):
                kind_of[key], line_of[key] = kind, number
            elif not (kind == "a list" and seen.startswith("a list")):
                raise DataError(f"{shown} line {number}: {key!r} is {kind} here but {seen} on line {line_of[key]}; "
                                f"a column holds one type")
        for key in file_keys:
            check_image(key, row.get(key), number)
        rows += 1
    return rows, [k for k in kind_of if not is_file_key(k)]


# A UTF-16 surrogate, which json decodes from an escape like \udce9 when no other half pairs with it
SURROGATE = re.compile("[\ud800-\udfff]")


def check_surrogates(row, shown, number):
    """DataError for a lone surrogate anywhere in a row: it is not a character, and pyarrow refuses the whole
    block over it ("ArrowInvalid: JSON parse error: The surrogate pair in string is invalid. in row 3")."""
    for key, value in row.items():
        found = lone_surrogate(value) or lone_surrogate(key)
        if found is None:
            continue
        code = ord(found)
        # \udc80-\udcff is what Python's errors="surrogateescape" makes of a byte that is not UTF-8
        why = (f"it stands for the byte 0x{code - 0xdc00:02x} of text that was not UTF-8 (Python's "
               f"errors=\"surrogateescape\"): decode that text with its real encoding" if 0xdc80 <= code <= 0xdcff
               else "write the character itself, or both halves of its UTF-16 pair")
        raise DataError(f"{shown} line {number}: {key!r} holds \\u{code:04x}, a lone surrogate escape, "
                             f"not a character; {why}")


def lone_surrogate(value):
    """The first surrogate in a decoded JSON value (strings, list items, object keys and values), or None."""
    if value.__class__ is str:
        found = SURROGATE.search(value)
        return found and found.group()
    items = value if value.__class__ is list else [*value, *value.values()] if value.__class__ is dict else ()
    for item in items:
        found = lone_surrogate(item)
        if found:
            return found
    return None


PLURALS = {"a string": "strings", "a number": "numbers", "a boolean": "booleans", "an object": "objects"}


def json_kind(value):
    """The type pyarrow gives a JSON value, in words; None for null, which fits any column."""
    if value is None:
        return None
    if isinstance(value, list):
        inner = {json_kind(v) for v in value} - {None}
        if len(inner) > 1:
            return "a list mixing " + " and ".join(sorted(PLURALS.get(k, "lists") for k in inner))
        return f"a list of {PLURALS.get(next(iter(inner)), 'lists')}" if inner else "a list"
    return ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
            else "a string" if isinstance(value, str) else "an object")


def csv_rows(text, shown, check_image):
    """Check each record of a metadata.csv and the file name in it; (rows, columns). DataError naming a bad
    line. pandas, which `datasets` uses, stops at a record with too many fields, and fills one with too few."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, start, rows = None, 1, 0  # start: the line the next record begins on (a quoted field may span lines)
    try:
        for record in reader:
            number, start = start, reader.line_num + 1
            if not any(field.strip() for field in record):
                continue
            if header is None:
                header, header_line = record, number
                file_columns = [(i, k) for i, k in enumerate(header) if is_file_key(k)]
                if not file_columns:
                    raise DataError(f"{shown} line {number}: no file_name column in the header "
                                    f"(columns: {', '.join(header)}); the first line names the columns")
                continue
            if len(record) != len(header):
                raise DataError(f"{shown} line {number}: {len(record)} field{'s' * (len(record) != 1)} but the "
                                f"header (line {header_line}) has {len(header)}; a comma in a caption needs quotes")
            for i, key in file_columns:
                check_image(key, record[i] or None, number)
            rows += 1
    except csv.Error as e:
        problem = "a quoted field opens here and is never closed" if "end of data" in str(e) else f"bad quoting ({e})"
        raise DataError(f"{shown} line {start}: {problem}") from None
    return rows, [k for k in header or [] if not is_file_key(k)]


class ImageFiles:
    """The image files a metadata file names, each checked as `datasets` will resolve it. Folders are listed
    once each instead of a stat per file: a COCO-sized metadata file names 120k images 600k times."""

    def __init__(self, folder, shown):
        self.folder, self.shown, self.listed = folder, shown, {}
        # Names known good: those of the metadata file's own folder, to start; but not one holding a backslash,
        # which `datasets` reads as a folder separator (metadata written on Windows): it looks for back/slash.jpg,
        # not for the file back\slash.jpg (datasets 5.2, folder_based_builder: normpath(name).replace("\\", "/")).
        self.present = {name for name in self.listing(folder) if "\\" not in name}

    def listing(self, folder):
        if folder not in self.listed:
            try:
                self.listed[folder] = set(os.listdir(folder))
            except OSError:
                self.listed[folder] = set()
        return self.listed[folder]

    def check(self, key, value, number):
        if value.__class__ is str and value in self.present:
            return
        where = f"{self.shown} line {number}"
        for name in value if isinstance(value, list) and key.endswith("file_names") else [value]:
            if name is None or name == "":
                raise DataError(f"{where}: no {key!r} naming the image")
            if not isinstance(name, str):
                raise DataError(f"{where}: {key!r} must be a file name (a string), not {name!r}")
            relative = os.path.normpath(name).replace("\\", "/")
            if "://" in name or os.path.isabs(name) or relative == ".." or relative.startswith("../"):
                raise DataError(f"{where}: {key} {name!r} must be a path inside {os.path.dirname(self.shown) or '.'}")
            path = os.path.join(self.folder, relative)
            folder, base = os.path.split(path)
            if base in self.listing(folder):
                self.present.add(name)
            elif "\\" in name and os.path.lexists(os.path.join(self.folder, name)):
                missing_images[os.path.realpath(path)] = (f"on {where}, whose backslash datasets reads as a folder "
                                                          f"separator: rename the file {name}")
            else:
                missing_images[os.path.realpath(path)] = f"on {where}"


# ---------------------------------------------------------------------------------------------
# Caption files: COCO captions (captions_train2017.json) and Karpathy splits (dataset_coco.json)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # restval trains, as usual


def read_caption_file(path):
    """A COCO captions or Karpathy split file -> (format name, image paths relative to the image root, the
    captions of each image, the split of each image or None). The format is told from the content. Raises
    DataError naming the file and the entry (`images[12]`, `annotations[3]`) that is wrong."""
    doc = read_json(path)
    images = doc.get("images") if doc.__class__ is dict else None
    if images is not None and "annotations" in doc:
        return ("COCO", *coco_rows(doc, path))
    if images.__class__ is list and any(e.__class__ is dict and "sentences" in e for e in images):
        return ("Karpathy", *karpathy_rows(images, path))
    what = (f"an object with {', '.join(json.dumps(k) for k in list(doc)[:6])}{', ...' if len(doc) > 6 else ''}"
            if doc.__class__ is dict and doc else json_kind(doc) or "null")
    raise DataError(f"{path}: {what}, neither a COCO captions file (an object with \"images\" and "
                         f"\"annotations\") nor a Karpathy split file (\"images\" whose entries have \"sentences\")")


def read_json(path):
    """A whole JSON file, parsed; DataError naming it when it cannot be read, is not UTF-8 or not JSON.

    A Karpathy sentence's `tokens` list is dropped as soon as the sentence is parsed: the tokens are most of
    the file's objects and nothing reads them (a 144 MB dataset_coco.json: 2.2 s and 0.5 GB instead of 4.6 s
    and 1 GB)."""
    text = read_text(path, path)  # the bytes are gone before the parsed objects are made
    try:
        return json.loads(text, object_hook=without_tokens)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: not a caption file (JSON nested too deeply to read)") from None


def without_tokens(obj):
    if "tokens" in obj and "raw" in obj:
        del obj["tokens"]
    return obj


def coco_rows(doc, path):
    """(file names, captions of each, None): one row per entry of `images`, whose annotations become its
    references. An image without annotations keeps an empty list: a bad row, like an empty caption."""
    images, annotations = doc["images"], doc["annotations"]
    for key, value in (("images", images), ("annotations", annotations)):
        if value.__class__ is not list:
            raise DataError(f"{path}: \"{key}\" must be a list, not {json_kind(value) or 'null'}")
    row_of, names = {}, []
    for i, entry in enumerate(images):
        try:
            image_id, name = entry["id"], entry["file_name"]
        except (TypeError, KeyError):
            image_id = name = None
        if image_id.__class__ not in (int, str) or name.__class__ is not str or not name:
            raise bad_entry(entry, f"{path} images[{i}]", (("id", ID), ("file_name", NAME)))
        if image_id in row_of:
            raise DataError(f"{path} images[{i}]: id {image_id!r} is also the id of images[{row_of[image_id]}]")
        row_of[image_id] = i
        names.append(name)
    refs = [[] for _ in names]
    for k, entry in enumerate(annotations):
        try:
            row, caption = row_of.get(entry["image_id"]), entry["caption"]
        except (TypeError, KeyError):  # not an object, a key missing, an id that is a list or an object
            row = caption = None
        if caption.__class__ is not str:
            raise bad_entry(entry, f"{path} annotations[{k}]", (("image_id", ID), ("caption", TEXT)))
        if row is None:
            raise DataError(f"{path} annotations[{k}]: image_id {entry['image_id']!r} is not the id of any "
                                 f"entry of \"images\"")
        refs[row].append(caption)
    if not names:
        raise DataError(f"{path}: \"images\" is empty")
    return names, refs, None


def karpathy_rows(images, path):
    """(image paths, captions of each, split of each): filepath/filename, sentences[].raw, and the split with
    restval counted as train."""
    names, refs, splits = [], [], []
    for i, entry in enumerate(images):
        try:
            name, folder, split = entry["filename"], entry.get("filepath"), KARPATHY_SPLITS[entry["split"]]
            texts = [s["raw"] for s in entry["sentences"]] if entry["sentences"].__class__ is list else None
            "".join(texts)  # TypeError when a caption is not a string: a tenth of the time of testing each one
        except (TypeError, KeyError, AttributeError):  # not an object, a key missing, an unknown split
            name = folder = texts = None
        if name.__class__ is not str or not name or folder.__class__ not in (str, type(None)) or texts is None:
            raise bad_entry(entry, f"{path} images[{i}]", KARPATHY_KEYS, sentences_problem)
        names.append(f"{folder}/{name}" if folder else name)
        refs.append(texts)
        splits.append(split)
    if not names:
        raise DataError(f"{path}: \"images\" is empty")
    return names, refs, splits


# What a caption file entry's key must hold: (test, in words)
ID = (lambda v: v.__class__ in (int, str), "an integer or a string")
NAME = (lambda v: v.__class__ is str and v != "", "a file name (a string)")
OPTIONAL = (lambda v: v is None or v.__class__ is str, "a folder name (a string)")  # the key may be left out
TEXT = (lambda v: v.__class__ is str, "a string")
SPLIT = (lambda v: v.__class__ is str and v in KARPATHY_SPLITS, "one of " + ", ".join(KARPATHY_SPLITS))
KARPATHY_KEYS = (("filename", NAME), ("filepath", OPTIONAL), ("split", SPLIT))


def bad_entry(entry, where, keys, more=None):
    """The DataError for a caption file entry that failed the quick test of the loop reading it: not an
    object, a key missing, a value of the wrong kind, or what `more(entry, where)` finds."""
    return DataError(entry_problem(entry, where, keys) or (more and more(entry, where))
                          or f"{where}: not a caption file entry")


def entry_problem(entry, where, keys):
    """What is wrong with an entry's keys, in one line; None when nothing is."""
    if entry.__class__ is not dict:
        return f"{where}: not an object ({{...}}) but {json_kind(entry) or 'null'}"
    for key, (fits, kind) in keys:
        if key not in entry:
            if fits is not OPTIONAL[0]:
                return f"{where}: no \"{key}\""
        elif not fits(entry[key]):
            return f"{where}: \"{key}\" must be {kind}, not {shown_value(entry[key])}"
    return None


def sentences_problem(entry, where):
    """What is wrong with a Karpathy entry's sentences, or None when they hold a "raw" string each."""
    if "sentences" not in entry:
        return f"{where}: no \"sentences\""
    sentences = entry["sentences"]
    if sentences.__class__ is not list:
        return f"{where}: \"sentences\" must be a list, not {shown_value(sentences)}"
    for j, sentence in enumerate(sentences):
        problem = entry_problem(sentence, f"{where} sentences[{j}]", (("raw", TEXT),))
        if problem:
            return problem
    return None


def shown_value(value):
    """A JSON value in an error message: short ones as they are, others by their kind."""
    text = json.dumps(value)
    return text if len(text) <= 40 else json_kind(value)
