"""Caption images with a fine-tuned GIT.

    python infer.py img.png photos/ https://example.com/cat.jpg    # path<TAB>caption per image
    python infer.py photos/ --recursive --json                      # one JSON object per image
    python infer.py photos/ --output captions.jsonl                 # or .csv
    python infer.py img.png --num-beams 3 --num-captions 3

From Python: `from infer import caption; caption(["img.png"], model="git-base-pokemon/best")`.

--model is a save_pretrained folder, a training output folder (its best/ is used) or a Hub id.
An input that cannot be read (missing, not an image, truncated, too many pixels, a failed
download) gets one line on stderr naming it; the others are still captioned; exit status 1.
"""
import csv
import functools
import json
import os
import sys

import cli
import hub

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("inputs", nargs="+", help="image files, folders of images, or http(s) URLs")
    a("--model", default="git-base-pokemon/best",
      help="a save_pretrained folder, a train.py output folder (uses its best/), or a Hub id")
    a("--recursive", action="store_true", help="also caption images in sub-folders of folder inputs")
    a("--json", action="store_true", help='print one JSON object per image: {"image", "caption", "captions", "error"}')
    a("--output", help="also write the results to this .jsonl or .csv file")
    a("--batch-size", type=cli.positive_int, default=16)
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
    a("--seed", type=int, default=0, help="for --do-sample")
    a("--trust-remote-code", action="store_true", help="allow a model that ships its own Python code to run it")
    a("--timeout", type=cli.positive_float, default=20.0, help="seconds to wait for a URL")
    a("--max-download-mb", type=cli.positive_float, default=50.0, help="refuse URL downloads larger than this")
    args = p.parse_args(argv)
    if args.num_captions > 1 and not args.do_sample and args.num_beams < args.num_captions:
        p.error("--num-captions above 1 needs --do-sample, or --num-beams at least as large")
    if args.output and not args.output.endswith((".jsonl", ".csv")):
        p.error(f"--output {args.output!r}: the file name must end in .jsonl or .csv")
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


def load_input(item, timeout=20.0, max_bytes=50 << 20):
    """An RGB PIL image from a path, URL or PIL image; raises DataError naming the input."""
    from data import DataError, open_image

    if is_url(item):
        try:
            return open_image(fetch(item, timeout, max_bytes))
        except DataError as e:
            message = str(e)
            raise DataError(message if message.startswith(item) else f"{item}: {message.split(': ', 1)[-1]}") from None
    return open_image(item)


# ---------------------------------------------------------------------------------------------
# The model

def resolve_model(name):
    """A train.py output folder means its best/ model."""
    best = os.path.join(name, "best")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")) and os.path.isdir(best):
        return best
    return name


@functools.lru_cache(maxsize=2)
def load(name, device_name="auto", precision="auto", trust_remote_code=False):
    """(model, processor, device, autocast dtype), cached so repeated caption() calls load once."""
    from model import load_model

    device = cli.pick_device(device_name)
    model, processor = load_model(resolve_model(name), trust_remote_code=trust_remote_code)
    model.to(device).eval()
    amp_dtype, _ = cli.pick_precision(precision, device)
    return model, processor, device, amp_dtype


def generate(model, processor, device, amp_dtype, images, max_length=50, batch_size=16, num_beams=1,
             do_sample=False, temperature=1.0, top_p=1.0, num_captions=1, seed=0):
    """A list (one per image) of lists of num_captions captions."""
    import torch

    if do_sample:
        torch.manual_seed(seed)
    options = dict(max_length=max_length, num_beams=num_beams, num_return_sequences=num_captions)
    if do_sample:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
    out = []
    for i in range(0, len(images), batch_size):
        pixels = processor.image_processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        with torch.inference_mode(), cli.autocast(device, amp_dtype):
            ids = model.generate(pixel_values=pixels.to(device), **options)
        texts = processor.batch_decode(ids, skip_special_tokens=True)
        out += [texts[k:k + num_captions] for k in range(0, len(texts), num_captions)]
    return out


def caption(images, model="git-base-pokemon/best", device="auto", precision="auto", trust_remote_code=False,
            **options):
    """Captions for images (paths, URLs or PIL images): one string each, or a list of
    num_captions strings each when num_captions > 1. Raises data.DataError for an unreadable image."""
    model_, processor, device_, amp_dtype = load(model, device, precision, trust_remote_code)
    pil = [load_input(x) for x in images]
    results = generate(model_, processor, device_, amp_dtype, pil, **options)
    return [r[0] for r in results] if options.get("num_captions", 1) == 1 else results


# ---------------------------------------------------------------------------------------------
# The command line

def write_output(path, rows):
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        if path.endswith(".csv"):
            w = csv.writer(f)
            w.writerow(["image", "caption", "error"])
            w.writerows([[r["image"], r["caption"] or "", r["error"] or ""] for r in rows])
        else:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    hub.offline_unless_needed(args.model)
    # Heavy imports after argument parsing, so --help and flag errors answer at once.
    import transformers

    from data import DataError
    from model import ModelLoadError

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model, processor, device, amp_dtype = load(args.model, args.device, args.precision, args.trust_remote_code)
    except (ModelLoadError, ValueError) as e:
        cli.fail(str(e))

    rows, images, good = [], [], []
    for item in expand_inputs(args.inputs, args.recursive):
        row = {"image": item, "caption": None, "captions": [], "error": None}
        try:
            images.append(load_input(item, args.timeout, int(args.max_download_mb * (1 << 20))))
            good.append(row)
        except DataError as e:
            row["error"] = str(e).split(": ", 1)[-1] if str(e).startswith(item) else str(e)
            print(f"error: {e}", file=sys.stderr)
        rows.append(row)
    if not rows:
        print("error: no images found in the inputs given", file=sys.stderr)
        return 1
    captions = generate(model, processor, device, amp_dtype, images, max_length=args.max_length,
                        batch_size=args.batch_size, num_beams=args.num_beams, do_sample=args.do_sample,
                        temperature=args.temperature, top_p=args.top_p, num_captions=args.num_captions, seed=args.seed)
    for row, texts in zip(good, captions):
        row["caption"], row["captions"] = texts[0], texts
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        elif row["error"] is None:
            for text in row["captions"]:
                print(f"{row['image']}\t{text}", flush=True)
    if args.output:
        try:
            write_output(args.output, rows)
        except OSError as e:
            print(f"error: --output {args.output!r}: {e.strerror}", file=sys.stderr)
            return 1
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
