"""An imagefolder's metadata.jsonl / metadata.csv, checked line by line before `datasets` reads it:
`datasets` reports a bad line as a pyarrow or pandas error about a row of a block, or loads it and
leaves the row without its image. Here each problem is a data.DataError naming the file and line.
"""
import csv
import io
import json
import os

import data

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# Image files a metadata line names but the folder lacks: path -> "FILE line N". Such a row is a bad row
# (skipped or named by --on-bad-sample, like an unreadable image); this tells read_row which line it came from.
missing_images = {}


def metadata_files(folder):
    """The metadata files `datasets` reads in an imagefolder: at its top, or in split sub-folders (train/, ...)."""
    found = []
    with os.scandir(folder) as entries:
        subs = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith((".", "__")))
    for where in [folder, *subs]:
        found += [os.path.join(where, n) for n in METADATA_NAMES if os.path.isfile(os.path.join(where, n))]
    return found


def check_metadata(path, shown):
    """Check a metadata.jsonl/csv as `datasets` will read it: UTF-8, one JSON object per line (or CSV records
    with the header's number of fields), a file name on every row, a column's type the same on every line.
    Raises DataError naming `shown` and the line; notes the rows whose image file is missing. Returns the
    columns besides the file names (those holding a value somewhere), which the loaded table must have."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise data.DataError(f"{shown}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line, line_start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
        raise data.DataError(f"{shown} line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start - line_start + 1}); save it as UTF-8") from None
    images = ImageFiles(os.path.dirname(path), shown)
    rows, columns = (jsonl_rows if path.endswith(".jsonl") else csv_rows)(text, shown, images.check)
    if not rows:
        raise data.DataError(f"{shown} has no rows: an imagefolder needs one line per image, with its file_name and caption")
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
            raise data.DataError(f"{shown} line {number}: not valid JSON ({e.msg}: column {e.colno})") from None
        if row.__class__ is not dict:
            raise data.DataError(f"{shown} line {number}: not a JSON object ({{...}}) but {json_kind(row)}")
        if file_keys is None:
            file_keys = [k for k in row if is_file_key(k)] or ["file_name"]
        for key, value in row.items():
            kind = "a string" if value.__class__ is str else json_kind(value)
            seen = kind_of.get(key)
            if kind == seen or kind is None:
                continue
            if kind.startswith("a list mixing"):
                raise data.DataError(f"{shown} line {number}: {key!r} is {kind}; a column holds one type")
            if seen is None or seen == "a list" and kind.startswith("a list"):
                kind_of[key], line_of[key] = kind, number
            elif not (kind == "a list" and seen.startswith("a list")):
                raise data.DataError(f"{shown} line {number}: {key!r} is {kind} here but {seen} on line {line_of[key]}; "
                                f"a column holds one type")
        for key in file_keys:
            check_image(key, row.get(key), number)
        rows += 1
    return rows, [k for k in kind_of if not is_file_key(k)]


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
                    raise data.DataError(f"{shown} line {number}: no file_name column in the header "
                                    f"(columns: {', '.join(header)}); the first line names the columns")
                continue
            if len(record) != len(header):
                raise data.DataError(f"{shown} line {number}: {len(record)} field{'s' * (len(record) != 1)} but the "
                                f"header (line {header_line}) has {len(header)}; a comma in a caption needs quotes")
            for i, key in file_columns:
                check_image(key, record[i] or None, number)
            rows += 1
    except csv.Error as e:
        problem = "a quoted field opens here and is never closed" if "end of data" in str(e) else f"bad quoting ({e})"
        raise data.DataError(f"{shown} line {start}: {problem}") from None
    return rows, [k for k in header or [] if not is_file_key(k)]


class ImageFiles:
    """The image files a metadata file names, each checked as `datasets` will resolve it. Folders are listed
    once each instead of a stat per file: a COCO-sized metadata file names 120k images 600k times."""

    def __init__(self, folder, shown):
        self.folder, self.shown, self.listed = folder, shown, {}
        self.present = self.listing(folder)  # names known good: those of the metadata file's own folder, to start

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
                raise data.DataError(f"{where}: no {key!r} naming the image")
            if not isinstance(name, str):
                raise data.DataError(f"{where}: {key!r} must be a file name (a string), not {name!r}")
            relative = os.path.normpath(name).replace("\\", "/")
            if "://" in name or os.path.isabs(name) or relative == ".." or relative.startswith("../"):
                raise data.DataError(f"{where}: {key} {name!r} must be a path inside {os.path.dirname(self.shown) or '.'}")
            path = os.path.join(self.folder, relative)
            folder, base = os.path.split(path)
            if base in self.listing(folder):
                self.present.add(name)
            else:
                missing_images[os.path.realpath(path)] = where
