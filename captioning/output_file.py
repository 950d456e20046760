"""infer.py --output: rows appended to OUTPUT.partial as they are made, renamed to OUTPUT when all
are done; --resume continues a partial made with the same inputs, model and generation settings.
"""
import csv
import fcntl
import io
import json
import os
from collections import Counter

from captioning import checkpoint, workers
from captioning.gitmodel import resolve_model
from captioning.strings import shown_name



CSV_HEADER = ["image", "caption", "error"]


def format_rows(rows, as_csv):
    """Rows as the bytes of .jsonl lines or .csv records."""
    if not as_csv:
        return "".join(json.dumps(row) + "\n" for row in rows).encode()
    text = io.StringIO()
    csv.writer(text).writerows([[r["image"], r["caption"] or "", r["error"] or ""] for r in rows])
    return text.getvalue().encode("utf-8", errors="surrogateescape")


def format_header():
    text = io.StringIO()
    csv.writer(text).writerow(CSV_HEADER)
    return text.getvalue().encode()


def complete_rows(data, as_csv):
    """(rows, their length in bytes) of the complete rows at the start of an output file's bytes.
    Whatever follows them (a row cut off by a kill in the middle of a write, or anything that is
    not a row infer.py writes) is not counted, to be cut off and redone."""
    text = data[:data.rfind(b"\n") + 1].decode("utf-8", errors="surrogateescape")
    rows, end, used = [], 0, [0]

    def lines():  # counts what the csv reader took, so that `end` falls after its last whole row
        for line in io.StringIO(text, newline=""):
            used[0] += len(line)
            yield line

    if as_csv:
        records = csv.reader(lines(), strict=True)
        try:
            if next(records, None) != CSV_HEADER:
                return [], 0
            end = used[0]
            for record in records:
                if len(record) != 3:
                    break
                rows.append({"image": record[0], "caption": record[1] or None, "error": record[2] or None})
                end = used[0]
        except csv.Error:
            pass
    else:
        for line in lines():
            try:
                row = json.loads(line)
            except ValueError:
                break
            if not (isinstance(row, dict) and row.keys() == {"image", "caption", "captions", "error"}
                    and isinstance(row["image"], str)):
                break
            rows.append(row)
            end = used[0]
    return rows, len(text[:end].encode("utf-8", errors="surrogateescape"))


class Output:
    """--output while a run writes it. Rows go to OUTPUT.partial, a batch per write, flushed, so a
    killed run keeps every row it captioned; when every input has its row the file is renamed to
    OUTPUT. OUTPUT.settings.json records what the rows are made with (model, generation and
    preprocessing flags), beside the partial file and then the finished one.

    With resume, the complete rows already in OUTPUT.partial (or, when there is none, a finished
    OUTPUT) are kept and counted as done, and a row cut off at the end is dropped; a resume whose
    settings differ from the record, or whose kept rows name images that are not among `items`,
    is refused before anything is changed. Raises OSError, or RuntimeError saying why not."""

    def __init__(self, path, items, settings, resume=False):
        self.path, self.partial, self.csv = path, f"{path}.partial", path.endswith(".csv")
        self.record = f"{path}.settings.json"
        self.done, self.restarted = [], False
        existed = os.path.exists(self.partial)
        # "a+b" does not truncate: a second run on the same --output must fail on the lock below,
        # not after it has emptied the first run's file.
        self.file = open(self.partial, "a+b")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise RuntimeError(f"another infer.py is writing {self.partial!r}") from None
        workers.hold(self.file)  # the reading workers forked later must not keep the lock after this process
        try:
            self.start(items, settings, resume, existed)
        except BaseException:
            if not existed:  # made by the open above: a later --resume must still find the finished OUTPUT
                os.remove(self.partial)
            self.close()  # a refused resume lets the file go, untouched
            raise

    def start(self, items, settings, resume, existed):
        path = self.path
        self.file.seek(0)
        kept, source = self.file.read(), self.partial
        if resume and not existed and os.path.isfile(path):
            with open(path, "rb") as f:
                kept, source = f.read(), path
        if resume:
            self.done, size = complete_rows(kept, self.csv)
            kept = kept[:size]
            self.pending, foreign = pending(items, self.done)
            if self.done:
                check_resume(source, self.record, settings, self.done, foreign)
        else:
            self.restarted, kept, self.pending = bool(kept), b"", list(items)
        checkpoint.write_file_atomically(self.record, json.dumps(settings, indent=1))
        self.file.seek(0)
        self.file.truncate()
        self.file.write(kept or (format_header() if self.csv else b""))
        self.file.flush()

    def write(self, rows):
        self.file.write(format_rows(rows, self.csv))
        self.file.flush()

    def finish(self):
        os.replace(self.partial, self.path)  # before closing: the lock is held until the name is gone
        self.close()

    def close(self):
        workers.let_go(self.file)
        self.file.close()


def pending(items, done_rows):
    """(the inputs without a row yet, in order; the names of rows that no input claims). An input
    given twice needs two rows."""
    done = Counter(row["image"] for row in done_rows)
    out = []
    for item in items:
        name = shown_name(item)
        if done[name]:
            done[name] -= 1
        else:
            out.append(item)
    return out, list((+done).elements())


class ResumeRefused(RuntimeError):
    """--resume would mix rows of another run into this one's; the message says how they differ."""


def check_resume(source, record, settings, done, foreign):
    """ResumeRefused unless the rows kept from `source` were made with these settings and all name inputs
    of this run: rows of another model, other flags or other images would pass for this run's."""
    if foreign:
        raise ResumeRefused(f"--resume: {len(foreign)} of the {len(done)} rows in {source!r} are for images that are "
                           f"not among the inputs given (the first: {', '.join(map(repr, foreign[:3]))}); resume "
                           f"with the same inputs, or start over without --resume")
    try:
        with open(record, encoding="utf-8") as f:
            made_with = json.load(f)
    except FileNotFoundError:
        raise ResumeRefused(f"--resume: {record!r} is missing, so nothing tells what the rows in {source!r} were "
                           f"made with; start over without --resume") from None
    except (OSError, ValueError) as e:
        raise ResumeRefused(f"--resume: {record!r} is unreadable ({getattr(e, 'strerror', None) or e}); start over "
                           f"without --resume") from None
    changed = [f"{key} {settings.get(key)!r} (was {made_with.get(key)!r})" for key in sorted({*settings, *made_with})
               if settings.get(key) != made_with.get(key)]
    if changed:
        raise ResumeRefused(f"--resume: the rows in {source!r} were made with other settings: {', '.join(changed)}; "
                           f"resume with those, or start over without --resume")


def run_settings(args, model_name, amp_dtype):
    """What the captions of a run depend on, as recorded beside --output: the model (a folder by its path
    and its weight files' sizes and times), the generation and preprocessing flags, the precision.
    Not the batch size or the workers, which change nothing (tested)."""
    model = resolve_model(model_name)
    weights = None
    if os.path.isdir(model):
        model = os.path.abspath(model)
        weights = {name: [os.path.getsize(os.path.join(model, name)), os.stat(os.path.join(model, name)).st_mtime_ns]
                   for name in sorted(os.listdir(model)) if name.endswith((".safetensors", ".bin"))}
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed) if args.do_sample else {}
    return {"model": model, "weights": weights, "max_length": args.max_length, "num_beams": args.num_beams,
            "do_sample": args.do_sample, **sampling, "num_captions": args.num_captions,
            "exact_preprocessing": args.exact_preprocessing, "max_image_pixels": args.max_image_pixels,
            "precision": "fp32" if amp_dtype is None else str(amp_dtype).split(".")[-1]}
