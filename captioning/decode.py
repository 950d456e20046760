"""Open one image as RGB, whatever it is stored as, and refuse what cannot or must not be decoded.

Images are decoded here (not by `datasets`) so that every mode becomes RGB the same way and a bad
file is reported by name. Only regular files are read (a FIFO or a device would block forever), and
an image that would decode to more pixels than --max-image-pixels is refused before it is decoded.
"""
import contextlib
import io
import os
import re
import stat

import numpy as np
from PIL import Image, ImageOps

from captioning import cli
from captioning.errors import DataError


# --max-image-pixels: an image that would decode to more pixels than this is refused before it is
# decoded. A 12000 x 12000 PNG of 140 KB took 2.4 GB to decode in each process; 40 Mpx of RGB is
# 120 MB. A JPEG counts at the size it is drafted to (see open_image), so a 200 Mpx photo, decoded
# at 1/8, passes. PIL's own limit (a warning at 89 Mpx, an error at 179) gives way to this one.
MAX_IMAGE_PIXELS = cli.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None
FILE_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
              stat.S_ISSOCK: "a socket"}


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
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e).splitlines()[0]) if str(e) else type(e).__name__
        raise DataError(f"{name}: not a readable image ({reason})") from None


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
