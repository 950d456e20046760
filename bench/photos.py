"""Write N photo-like JPEGs with captions as an HF imagefolder, for measuring infer.py on photos.

    python bench/photos.py --out /tmp/photos --n 2000 [--size 1280x960] [--seed 0] [--workers N]

Each image is a drawn scene of synthetic.py (its shapes and their places, so its caption is
true) scaled up onto a lit two-colour gradient, with texture at several scales, film grain and
vignetting, saved at JPEG quality 90: about 250 KB at 1280 x 960, close to a phone photo's
cost to decode (the flat drawn scenes alone compress to a few KB and decode too fast to tell
anything). metadata.jsonl holds `file_name` and `text`, a list of 5 captions: the scene's and
four rewordings. The same --seed gives the same bytes, whatever --workers.
"""
import argparse
import json
import os
import sys
from multiprocessing import Pool

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from captioning import cli, synthetic  # noqa: E402

QUALITY = 90
# Amplitudes (in 0-255 levels) of the luminance added at three scales, and of per-pixel grain:
# chosen so that JPEG at quality 90 lands at 200-300 KB for 1280 x 960, as photos do.
LIGHT, TEXTURE_COARSE, TEXTURE_FINE, GRAIN = 25.0, 12.0, 10.0, 2.5
TEMPLATES = ("{}", "a photo of {}", "there is {}", "an image showing {}", "a picture with {}")


def size_type(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: each side must be at least 16 pixels")
    return width, height


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--out", required=True, help="the folder to write (created; must not hold a metadata.jsonl)")
    p.add_argument("--n", type=cli.positive_int, default=2000)
    p.add_argument("--size", type=size_type, default=(1280, 960), help="WIDTHxHEIGHT (default 1280x960)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=cli.positive_int, default=cli.usable_cores(), help="processes writing images")
    return p.parse_args(argv)


def smooth_field(rng, height, width, step):
    """Normal random values on a grid `step` pixels apart, interpolated bicubically: (height,
    width) float32, spread about 1, features about `step` pixels across."""
    import numpy as np
    from PIL import Image

    grid = rng.standard_normal((height // step + 3, width // step + 3), dtype=np.float32)
    full = Image.fromarray(grid).resize(((width // step + 3) * step, (height // step + 3) * step),
                                                 Image.BICUBIC if step > 2 else Image.BILINEAR)
    return np.asarray(full, dtype=np.float32)[step:step + height, step:step + width]


def photo(seed, index, width, height):
    """(a photo-like RGB PIL image, the scene's caption), the same for the same arguments."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    scene, caption = synthetic.scene(seed, index, size=320)
    drawn = np.asarray(scene)
    shape_mask = Image.fromarray(((drawn != drawn[0, 0]).any(axis=-1) * 255).astype(np.uint8))
    # Scaled up bicubically: soft edges, as a lens gives, not the drawing's hard steps.
    shapes = np.asarray(scene.resize((width, height), Image.BICUBIC), dtype=np.float32)
    alpha = np.asarray(shape_mask.resize((width, height), Image.BICUBIC), dtype=np.float32)[..., None] / 255

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * x / width + np.sin(angle) * y / height
    ramp = ((ramp - ramp.min()) / (ramp.max() - ramp.min()))[..., None]
    near, far = rng.uniform(60, 230, 3).astype(np.float32), rng.uniform(60, 230, 3).astype(np.float32)
    image = (near + ramp * (far - near)) * (1 - alpha) + shapes * alpha
    light = (LIGHT * smooth_field(rng, height, width, max(width, height) // 5)
             + TEXTURE_COARSE * smooth_field(rng, height, width, 8)
             + TEXTURE_FINE * smooth_field(rng, height, width, 2))
    image += light[..., None] + rng.normal(0, GRAIN, image.shape).astype(np.float32)
    image *= (1 - 0.35 * (((x - width / 2) / width) ** 2 + ((y - height / 2) / height) ** 2))[..., None]
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8)), caption


def write_one(job):
    out, seed, index, width, height = job
    image, caption = photo(seed, index, width, height)
    name = f"{index:06d}.jpg"
    image.save(os.path.join(out, name), quality=QUALITY)
    return {"file_name": name, "text": [t.format(caption) for t in TEMPLATES]}


def main(argv=None):
    args = parse_args(argv)
    if os.path.isfile(os.path.join(args.out, "metadata.jsonl")):
        cli.fail(f"--out {args.out!r} already holds a metadata.jsonl; pick another folder or delete it")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        cli.fail(f"--out {args.out!r}: {e.strerror}")
    width, height = args.size
    jobs = [(args.out, args.seed, i, width, height) for i in range(args.n)]
    with Pool(min(args.workers, args.n)) as pool:
        rows = list(pool.imap(write_one, jobs, chunksize=4))
    # metadata.jsonl last, renamed into place: a folder that has one holds every image it names.
    tmp = os.path.join(args.out, "metadata.jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, os.path.join(args.out, "metadata.jsonl"))
    megabytes = sum(os.path.getsize(os.path.join(args.out, r["file_name"])) for r in rows) / 1e6
    print(f"wrote {args.n} JPEGs of {width}x{height} ({megabytes / args.n * 1000:.0f} KB each on average) "
          f"and metadata.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
