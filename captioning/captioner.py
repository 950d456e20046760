"""Caption images: read inputs (files, folders, URLs) a few batches ahead of the model in worker
processes, generate, and give rows of captions as they are made. infer.py's library half.

From Python: `from captioning.captions import caption; caption(["img.png"], model="git-base-pokemon/best")`.
"""
import functools
import os
import urllib.request

import torch
import transformers

from captioning import cli, decode, runtime, workers
from captioning.decode import draft_size
from captioning.errors import DataError, ModelLoadError
from captioning.gitmodel import load_model, resolve_model
from captioning.strings import shown_name




IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# Batches each worker process keeps ready (DataLoader's prefetch_factor): at most
# batch-size x num-workers x PREFETCH images are decoded ahead of generate, however many inputs.
PREFETCH = 2


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
    draft: the shortest edge the image will be resized to (see decode.open_image)."""
    if is_url(item):
        try:
            return decode.open_image(fetch(item, timeout, max_bytes), draft=draft, max_pixels=max_pixels)
        except DataError as e:
            message = str(e)
            raise DataError(message if message.startswith(item) else f"{item}: {message.split(': ', 1)[-1]}") from None
    return decode.open_image(item, draft=draft, max_pixels=max_pixels)


def new_row(image):
    return {"image": shown_name(image), "caption": None, "captions": [], "error": None}


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
    num_workers = min(num_workers, -(-len(reader) // batch_size))  # no idle processes for a few images
    return torch.utils.data.DataLoader(
        reader, batch_size=batch_size, num_workers=num_workers, collate_fn=Collate(image_processor),
        prefetch_factor=PREFETCH if num_workers else None, in_order=True,
        worker_init_fn=workers.initializer(ignore_sigterm=False) if num_workers else None,
        # Its own generator: the iterator's seed draw must not move the global RNG that
        # --do-sample was seeded with, or the sampled captions would depend on --num-workers.
        generator=torch.Generator())


def reader_for(items, image_processor, exact=False, timeout=20.0, max_bytes=50 << 20, max_pixels=cli.MAX_IMAGE_PIXELS):
    return Reader(items, None if exact else draft_size(image_processor), timeout, max_bytes, max_pixels)


@functools.lru_cache(maxsize=2)
def load(name, device_name="auto", precision="auto", trust_remote_code=False, attention="auto"):
    """(model, processor, device, autocast dtype), cached so repeated caption() calls load once."""
    device = runtime.pick_device(device_name)
    amp_dtype, _ = runtime.pick_precision(precision, device)
    model, processor = load_model(resolve_model(name), trust_remote_code=trust_remote_code,
                                  attention=runtime.pick_attention(attention, device))
    model.to(device).eval()
    return model, processor, device, amp_dtype


def load_for_command(args):
    """load() for a command's --model, --device, --precision, --trust-remote-code and --attention, with
    transformers' own logging quiet; a model that cannot be loaded is one line and exit status 2."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return load(args.model, args.device, args.precision, args.trust_remote_code, args.attention)
    except (ModelLoadError, ValueError) as e:
        cli.fail(str(e))


def generation_options(max_length=50, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0, num_captions=1):
    options = dict(max_length=max_length, num_beams=num_beams, num_return_sequences=num_captions)
    if do_sample:
        options.update(do_sample=True, temperature=temperature, top_p=top_p)
    return options


def generate_pixels(model, processor, device, amp_dtype, pixels, options):
    """One batch of preprocessed pixels -> a list (one per image) of lists of captions."""
    with torch.inference_mode(), runtime.autocast(device, amp_dtype):
        ids = model.generate(pixel_values=pixels.to(device), **options)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    n = options["num_return_sequences"]
    return [texts[k:k + n] for k in range(0, len(texts), n)]


def generate(model, processor, device, amp_dtype, images, max_length=50, batch_size=16, num_beams=1,
             do_sample=False, temperature=1.0, top_p=1.0, num_captions=1, seed=0):
    """Decoded PIL images -> a list (one per image) of lists of num_captions captions."""
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
    num_captions strings each when num_captions > 1. Raises DataError for an unreadable image.
    The same reading, preprocessing and batching as the command line, so the same captions;
    num_workers 0 (the default here) starts no processes."""
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
