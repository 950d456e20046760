"""The built-in captioning set (`--dataset synthetic`): drawn scenes of one or two coloured shapes,
each with a compositional caption ("a small red circle at the top left and a large blue square on
the right"). Generated on the fly, deterministic by seed and index, so the offline demo, the tests
and the benchmark need no download and always see the same pictures.
"""
import random

import datasets
from PIL import Image, ImageDraw


COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
          "yellow": (235, 200, 0), "purple": (140, 40, 170), "orange": (245, 130, 0)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.10, "large": 0.17}  # radius as a fraction of the image side
PLACES = {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
          (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
          (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}


def scene(seed, index, size=128):
    """One drawn scene and its caption; the same (seed, index) always gives the same pair."""
    rng = random.Random(seed * 1_000_003 + index)
    tint = [rng.randint(225, 255) for _ in range(3)]
    img = Image.new("RGB", (size, size), tuple(tint))
    draw = ImageDraw.Draw(img)
    cells = rng.sample(sorted(PLACES), rng.randint(1, 2))
    phrases = []
    for row, col in sorted(cells):  # caption objects in reading order, so the caption is unique
        color, shape, size_name = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice(sorted(SIZES))
        r = SIZES[size_name] * size
        cx = (col + 0.5) * size / 3 + rng.uniform(-0.04, 0.04) * size
        cy = (row + 0.5) * size / 3 + rng.uniform(-0.04, 0.04) * size
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
        elif shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=COLORS[color])
        phrases.append(f"a {size_name} {color} {shape} {PLACES[(row, col)]}")
    return img, " and ".join(phrases)


def retellings(caption, k):
    """k different captions of one scene, the first the scene's own: several references, like
    the five COCO has for each image (for --caption-sampling all, its tests and benchmark)."""
    parts = caption.split(" and ")
    told = [caption, " and ".join(reversed(parts)) if len(parts) > 1 else "an image of " + caption,
            "there is " + caption, "a picture of " + caption, "a drawing with " + caption]
    told += [f"{caption} (version {i})" for i in range(len(told), k)]
    return told[:k]


def dataset(n, seed=0, captions_per_image=1):
    """The first n scenes of `seed` as a `datasets` table with an image and a text column (a list
    of captions when captions_per_image > 1)."""
    scenes = [scene(seed, i) for i in range(n)]
    if captions_per_image == 1:
        text, text_type = [s[1] for s in scenes], datasets.Value("string")
    else:
        text = [retellings(s[1], captions_per_image) for s in scenes]
        text_type = datasets.Sequence(datasets.Value("string"))
    features = datasets.Features({"image": datasets.Image(), "text": text_type})
    return datasets.Dataset.from_dict({"image": [s[0] for s in scenes], "text": text}, features=features)
