"""Caption images with a fine-tuned GIT.

    python infer.py img.png photos/ https://example.com/cat.jpg    # path<TAB>caption per image
    python infer.py photos/ --recursive --json                      # one JSON object per image
    python infer.py photos/ --output captions.jsonl                 # or .csv
    python infer.py photos/ --output captions.jsonl --resume        # after a kill: caption the rest
    python infer.py img.png --num-beams 3 --num-captions 3

From Python: `from infer import caption; caption(["img.png"], model="git-base-pokemon/best")`.

--model is a save_pretrained folder, a training output folder (its best/ is used) or a Hub id.
Images are read, decoded and preprocessed by --num-workers processes a few batches ahead of the
model; each batch's captions are printed, and appended to --output, as soon as they exist.
An input that cannot be read (missing, not an image, truncated, too many pixels, a failed
download) gets one line on stderr naming it; the others are still captioned; exit status 1.
"""
import csv
import fcntl
import functools
import io
import json
import os
import sys
from collections import Counter

import cli
import hub
import workers
from progress import RaiseOnSignal, Stopped

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Batches each worker process keeps ready (DataLoader's prefetch_factor): at most
# batch-size x num-workers x PREFETCH images are decoded ahead of generate, however many inputs.
PREFETCH = 2
CSV_HEADER = ["image", "caption", "error"]


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("inputs", nargs="+", help="image files, folders of images, or http(s) URLs")
    a("--model", default="git-base-pokemon/best",
      help="a save_pretrained folder, a train.py output folder (uses its best/), or a Hub id")
    a("--recursive", action="store_true", help="also caption images in sub-folders of folder inputs")
    a("--json", action="store_true", help='print one JSON object per image: {"image", "caption", "captions", "error"}')
    a("--output", help="also write the results to this .jsonl or .csv file (OUTPUT.partial until all are done)")
    a("--resume", action="store_true",
      help="with --output: keep the rows already in OUTPUT.partial (or a finished OUTPUT) and caption the rest")
    a("--batch-size", type=cli.positive_int, default=32,
      help="images per generate call (on 2 CPU cores, 2,000 photos: 17.0 s at 16, 13.0 s at 32)")
    a("--num-workers", type=cli.non_negative_int, default=max(1, cli.usable_cores() // 2),
      help="processes that read, decode and preprocess images ahead of the model (default: half the usable "
           "cores, at least 1; on a CPU the model keeps the other half); 0: all in this process")
    a("--exact-preprocessing", action="store_true",
      help="decode JPEGs at full size before resizing, so pixels equal the image processor's own output "
           "(slower; by default a large JPEG is decoded at 1/2, 1/4 or 1/8 size)")
    a("--max-image-pixels", type=cli.non_negative_int, default=cli.MAX_IMAGE_PIXELS, help=cli.MAX_IMAGE_PIXELS_HELP)
    a("--max-length", type=cli.positive_int, default=50, help="max_length for model.generate (caption tokens)")
    a("--num-beams", type=cli.positive_int, default=1)
    a("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    a("--temperature", type=cli.positive_float, default=1.0)
    a("--top-p", type=cli.probability, default=1.0)
    a("--num-captions", type=cli.positive_int, default=1,
      help="captions per image (needs --do-sample or --num-beams >= it)")
    a("--device", choices=cli.DEVICES, default="auto")
    a("--precision", choices=cli.PRECISIONS, default="auto",
      help="auto: fp16 on CUDA, bf16 on CPUs with bf16 matrix units, else fp32")
    a("--attention", choices=cli.ATTENTIONS, default="auto", help=cli.ATTENTION_HELP)
    a("--seed", type=int, default=0, help="for --do-sample")
    a("--trust-remote-code", action="store_true", help="allow a model that ships its own Python code to run it")
    a("--timeout", type=cli.positive_float, default=20.0, help="seconds to wait for a URL")
    a("--max-download-mb", type=cli.positive_float, default=50.0, help="refuse URL downloads larger than this")
    args = p.parse_args(argv)
    if args.num_captions > 1 and not args.do_sample and args.num_beams < args.num_captions:
        p.error("--num-captions above 1 needs --do-sample, or --num-beams at least as large")
    if args.output and not args.output.endswith((".jsonl", ".csv")):
        p.error(f"--output {args.output!r}: the file name must end in .jsonl or .csv")
    if args.output and os.path.isdir(args.output):
        p.error(f"--output {args.output!r} is a folder; name a .jsonl or .csv file")
    if args.resume and not args.output:
        p.error("--resume needs --output: it continues the rows written to OUTPUT.partial")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs

def expand_inputs(inputs, recursive=False):
    """Files, URLs, and the images inside folders (sorted), in the order given."""
    out = []
    for item in inputs:
        if isinstance(item, str) and os.path.isdir(item):
            found = []
            for root, dirs, files in os.walk(item):
                dirs.sort()
                found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
                if not recursive:
                    break
            out += sorted(found)
        else:
            out.append(item)
    return out


def is_url(item):
    return isinstance(item, str) and item.startswith(("http://", "https://"))


def fetch(url, timeout, max_bytes):
    """The bytes at url; raises DataError naming the URL."""
    import urllib.request

    from data import DataError

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "git-caption"}),
                                    timeout=timeout) as response:
            size = response.headers.get("Content-Length")
            if size is not None and int(size) > max_bytes:
                raise DataError(f"{url}: download refused, {int(size)} bytes is over --max-download-mb")
            body = response.read(max_bytes + 1)
    except DataError:
        raise
    except Exception as e:  # HTTPError, URLError, timeouts, bad headers: all a failed download
        reason = f"HTTP {e.code} {e.reason}" if hasattr(e, "code") else getattr(e, "reason", None) or str(e) or type(e).__name__
        raise DataError(f"{url}: download failed ({reason})") from None
    if len(body) > max_bytes:
        raise DataError(f"{url}: download refused, over --max-download-mb")
    return body


def load_input(item, timeout=20.0, max_bytes=50 << 20, draft=None, max_pixels=cli.MAX_IMAGE_PIXELS):
    """An RGB PIL image from a path, URL or PIL image; raises DataError naming the input.
    draft: the shortest edge the image will be resized to (see data.open_image)."""
    from data import DataError, open_image

    if is_url(item):
        try:
            return open_image(fetch(item, timeout, max_bytes), draft=draft, max_pixels=max_pixels)
        except DataError as e:
            message = str(e)
            raise DataError(message if message.startswith(item) else f"{item}: {message.split(': ', 1)[-1]}") from None
    return open_image(item, draft=draft, max_pixels=max_pixels)


def new_row(image):
    return {"image": shown_name(image), "caption": None, "captions": [], "error": None}


# Characters a name may hold that would break a line of output or its encoding: C0 and C1 controls
# (a newline, a tab, ESC), DEL, the Unicode line and paragraph separators (str.splitlines splits on them).
_BREAKING = {*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029}


def shown_name(name):
    """A file name as every output writes it (stdout's path<TAB>caption, --json, --output): as it is,
    but for a byte that is not UTF-8 (Python holds it as a lone surrogate, caf\udce9) and a control
    character, which are written as Python escapes (caf\xe9.jpg, a\nb.jpg). So each name stays on
    its line, every output is valid UTF-8, and --resume and metrics.py match the names again."""
    if all(ord(ch) not in _BREAKING and not 0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the undecodable byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code in _BREAKING or 0xD800 <= code <= 0xDFFF:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch) or
                       (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"))
        else:
            out.append(ch)
    return "".join(out)


class Reader:
    """The inputs as a map-style dataset for torch's DataLoader: reader[i] is (row, decoded RGB image
    or None). An unreadable input is a row with its error, not an exception, so that it leaves the
    other images of its batch alone. A plain class: importing infer must not import torch."""

    def __init__(self, items, draft=None, timeout=20.0, max_bytes=50 << 20, max_pixels=cli.MAX_IMAGE_PIXELS):
        self.items, self.draft, self.timeout, self.max_bytes = items, draft, timeout, max_bytes
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from data import DataError

        item = self.items[i]
        name = item if isinstance(item, str) else "image"  # the name open_image gives a PIL input
        row = new_row(item if isinstance(item, str) else f"image {i}")
        try:
            return row, load_input(item, self.timeout, self.max_bytes, self.draft, self.max_pixels)
        except DataError as e:
            row["error"] = shown_name(str(e).removeprefix(f"{name}: "))
            return row, None


def preprocess(image_processor, images):
    """The checkpoint's image processor over a batch of PIL images: (N, 3, H, W) float32."""
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


class Collate:
    """A batch of Reader items -> (rows, pixels of the readable ones or None), run in the worker.
    Pixels travel back as a numpy array, pickled through the worker's pipe rather than placed in
    shared memory: a container's small /dev/shm (64 MB by default in Docker) is then no limit."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, batch):
        images = [image for _, image in batch if image is not None]
        return [row for row, _ in batch], preprocess(self.image_processor, images).numpy() if images else None


def loader(reader, image_processor, batch_size=16, num_workers=0):
    """Batches of (rows, pixels) in input order, num_workers processes reading ahead; with
    num_workers 0 each batch is read in this process when it is asked for."""
    import torch

    num_workers = min(num_workers, -(-len(reader) // batch_size))  # no idle processes for a few images
    return torch.utils.data.DataLoader(
        reader, batch_size=batch_size, num_workers=num_workers, collate_fn=Collate(image_processor),
        prefetch_factor=PREFETCH if num_workers else None, in_order=True,
        worker_init_fn=workers.initializer(ignore_sigterm=False) if num_workers else None,
        # Its own generator: the iterator's seed draw must not move the global RNG that
        # --do-sample was seeded with, or the sampled captions would depend on --num-workers.
        generator=torch.Generator())


def reader_for(items, image_processor, exact=False, timeout=20.0, max_bytes=50 << 20, max_pixels=cli.MAX_IMAGE_PIXELS):
    from data import draft_size

    return Reader(items, None if exact else draft_size(image_processor), timeout, max_bytes, max_pixels)


# ---------------------------------------------------------------------------------------------
# The model

def resolve_model(name):
    """A train.py output folder means its best/ model."""
    best = os.path.join(name, "best")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")) and os.path.isdir(best):
        return best
    return name


@functools.lru_cache(maxsize=2)
def load(name, device_name="auto", precision="auto", trust_remote_code=False, attention="auto"):
    """(model, processor, device, autocast dtype), cached so repeated caption() calls load once."""
    from model import load_model

    device = cli.pick_device(device_name)
    amp_dtype, _ = cli.pick_precision(precision, device)
    model, processor = load_model(resolve_model(name), trust_remote_code=trust_remote_code,
                                  attention=cli.pick_attention(attention, device))
    model.to(device).eval()
    return model, processor, device, amp_dtype


def generation_options(max_length=50, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0, num_captions=1):
    options = dict(max_length=max_length, num_beams=num_beams, num_return_sequences=num_captions)
    if do_sample:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
    return options


def generate_pixels(model, processor, device, amp_dtype, pixels, options):
    """One batch of preprocessed pixels -> a list (one per image) of lists of captions."""
    import torch

    with torch.inference_mode(), cli.autocast(device, amp_dtype):
        ids = model.generate(pixel_values=pixels.to(device), **options)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    n = options["num_return_sequences"]
    return [texts[k:k + n] for k in range(0, len(texts), n)]


def generate(model, processor, device, amp_dtype, images, max_length=50, batch_size=16, num_beams=1,
             do_sample=False, temperature=1.0, top_p=1.0, num_captions=1, seed=0):
    """Decoded PIL images -> a list (one per image) of lists of num_captions captions."""
    import torch

    if do_sample:
        torch.manual_seed(seed)
    options = generation_options(max_length, num_beams, do_sample, temperature, top_p, num_captions)
    out = []
    for i in range(0, len(images), batch_size):
        pixels = preprocess(processor.image_processor, images[i:i + batch_size])
        out += generate_pixels(model, processor, device, amp_dtype, pixels, options)
    return out


def captioned(model, processor, device, amp_dtype, batches, do_sample=False, seed=0, **options):
    """Each batch's rows, in input order, with captions filled in, as soon as generate has them."""
    import torch

    if do_sample:
        torch.manual_seed(seed)
    options = generation_options(do_sample=do_sample, **options)
    for rows, pixels in batches:
        if pixels is not None:
            good = [row for row in rows if row["error"] is None]
            texts = generate_pixels(model, processor, device, amp_dtype, torch.from_numpy(pixels), options)
            for row, captions in zip(good, texts):
                row["caption"], row["captions"] = captions[0], captions
        yield rows


def caption(images, model="git-base-pokemon/best", device="auto", precision="auto", trust_remote_code=False,
            exact_preprocessing=False, num_workers=0, batch_size=16, timeout=20.0, max_download_mb=50.0,
            attention="auto", max_image_pixels=cli.MAX_IMAGE_PIXELS, **options):
    """Captions for images (paths, URLs or PIL images): one string each, or a list of
    num_captions strings each when num_captions > 1. Raises data.DataError for an unreadable image.
    The same reading, preprocessing and batching as the command line, so the same captions;
    num_workers 0 (the default here) starts no processes."""
    from data import DataError

    model_, processor, device_, amp_dtype = load(model, device, precision, trust_remote_code, attention)
    reader = reader_for(list(images), processor.image_processor, exact_preprocessing, timeout,
                        int(max_download_mb * (1 << 20)), max_image_pixels)
    results = []
    for rows in captioned(model_, processor, device_, amp_dtype,
                          loader(reader, processor.image_processor, batch_size, num_workers), **options):
        for row in rows:
            if row["error"]:
                raise DataError(f"{row['image']}: {row['error']}")
            results.append(row["captions"])
    return [r[0] for r in results] if options.get("num_captions", 1) == 1 else results


# ---------------------------------------------------------------------------------------------
# --output: rows appended to OUTPUT.partial as they come, renamed to OUTPUT when all are done

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
        write_json_atomically(self.record, settings)
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


def write_json_atomically(path, value):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The command line

class Printer:
    """Rows to stdout and errors to stderr, each line flushed as it is written; a progress bar
    with images/s on stderr when stderr is a terminal (lines are printed above it)."""

    def __init__(self, as_json, total, initial=0):
        self.as_json, self.bar = as_json, None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", file=sys.stderr, dynamic_ncols=True)

    def line(self, text, stream):
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def rows(self, rows):
        for row in rows:
            if row["error"] is not None:
                self.line(f"error: {row['image']}: {row['error']}", sys.stderr)
            if self.as_json:
                self.line(json.dumps(row), sys.stdout)
            elif row["error"] is None:
                for text in row["captions"]:
                    self.line(f"{row['image']}\t{text}", sys.stdout)
        if self.bar is not None:
            self.bar.update(len(rows))

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None):
    args = parse_args(argv)
    with RaiseOnSignal():  # Ctrl-C or SIGTERM: one line, the rows so far kept, exit 128 + the signal's number
        try:
            return caption_inputs(args)
        except Stopped as e:
            print(f"stopped by {e.name}", file=sys.stderr)
            return 128 + e.signum


def caption_inputs(args):
    # Names are written escaped (shown_name); anything else that a strict encoding cannot take, escaped too.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    hub.offline_unless_needed(args.model)
    # Heavy imports after argument parsing, so --help and flag errors answer at once.
    import torch
    import transformers

    from model import ModelLoadError

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, processor, device, amp_dtype = load(args.model, args.device, args.precision, args.trust_remote_code,
                                                   args.attention)
    except (ModelLoadError, ValueError) as e:
        cli.fail(str(e))

    if device.type == "cpu" and args.num_workers:
        # generate's many small ops wait on every thread at each step: a thread that shares its core
        # with a reading worker stalls all the others. Measured on 2 cores, 2,000 photos: 22.5 s with
        # 2 threads beside the workers, 15.5 s with 1 thread and 1 worker (README: Real-sized data).
        torch.set_num_threads(max(1, cli.usable_cores() - args.num_workers))
    items = expand_inputs(args.inputs, args.recursive)
    if not items:
        print("error: no images found in the inputs given", file=sys.stderr)
        return 1
    output, pending = None, items
    if args.output:
        try:
            output = Output(args.output, items, run_settings(args, args.model, amp_dtype), args.resume)
        except ResumeRefused as e:
            cli.fail(str(e))
        except (OSError, RuntimeError) as e:
            cli.fail(f"--output {args.output!r}: {getattr(e, 'strerror', None) or e}", status=1)
        pending = output.pending
        if output.restarted:
            print(f"note: {output.partial} from an earlier run is started over (--resume continues it)",
                  file=sys.stderr, flush=True)
        if args.resume:
            print(f"resuming: {len(items) - len(pending)} of {len(items)} inputs already in {output.partial}",
                  file=sys.stderr, flush=True)
    bad = sum(row["error"] is not None for row in output.done) if output else 0
    reader = reader_for(pending, processor.image_processor, args.exact_preprocessing, args.timeout,
                        int(args.max_download_mb * (1 << 20)), args.max_image_pixels)
    batches = captioned(model, processor, device, amp_dtype,
                        loader(reader, processor.image_processor, args.batch_size, args.num_workers),
                        max_length=args.max_length, num_beams=args.num_beams, do_sample=args.do_sample,
                        temperature=args.temperature, top_p=args.top_p, num_captions=args.num_captions,
                        seed=args.seed)
    printer = Printer(args.json, len(items), len(items) - len(pending))
    try:
        for rows in batches:
            if output:  # first, so that a row seen on the screen is in the file
                save(output, output.write, rows)
            printer.rows(rows)
            bad += sum(row["error"] is not None for row in rows)
        printer.close()
        if output:
            save(output, output.finish)
    except Stopped as e:
        printer.close()
        print(f"stopped by {e.name}{kept(output)}", file=sys.stderr)
        return 128 + e.signum
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        printer.close()  # a reading process was killed (out of memory, say)
        cli.fail(f"{str(e).splitlines()[0].rstrip('. ')}{kept(output)}", status=1)
    return 1 if bad else 0


def kept(output):
    return f"; the rows so far are in {output.partial!r}, --resume continues" if output else ""


def save(output, write, *rows):
    """A write to --output, or one line naming the file and exit status 1 (disk full, say); the
    rows written before stay in OUTPUT.partial for --resume."""
    try:
        write(*rows)
    except OSError as e:
        cli.fail(f"--output {output.path!r}: {e.strerror or e}", status=1)


if __name__ == "__main__":
    sys.exit(main())
