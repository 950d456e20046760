"""Pictures of a run for people: caption cards for TensorBoard, and curves.png."""
import os
import textwrap

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw


def caption_card(image, prediction, reference):
    """A thumbnail with the generated caption (and the reference) written under it, for TensorBoard."""
    thumb = image.copy()
    thumb.thumbnail((224, 224))
    lines = ["gen: " + l for l in textwrap.wrap(prediction or "(empty)", 36)]
    lines += ["ref: " + l for l in textwrap.wrap(reference, 36)]
    card = Image.new("RGB", (max(thumb.width, 240), thumb.height + 12 * len(lines) + 6), "white")
    card.paste(thumb, (0, 0))
    draw = ImageDraw.Draw(card)
    for k, line in enumerate(lines):
        draw.text((3, thumb.height + 3 + 12 * k), line, fill=(0, 0, 0))
    return np.asarray(card)


def draw_curves(path, train_log, history):
    """Train loss and eval WER against optimizer step, one PNG for people who do not run TensorBoard."""
    matplotlib.use("Agg")  # headless
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot([s for s, _ in train_log], [v for _, v in train_log], marker=".")
    left.set(title="train loss", xlabel="optimizer step")
    right.plot([h["step"] for h in history], [h["wer"] for h in history], marker="o", color="tab:red")
    right.set(title="eval WER (generated captions)", xlabel="optimizer step")
    fig.tight_layout()
    fig.savefig(f"{path}.tmp.png", dpi=100)
    plt.close(fig)
    os.replace(f"{path}.tmp.png", path)
