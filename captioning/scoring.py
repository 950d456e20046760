"""metrics.py --model: score a saved model on a dataset as train.py's evaluation does, with its code.

The split comes from sources.load_tables, the pixels from image_cache, the loader from
evaluation.make_eval_loader, generation and the teacher-forced loss from evaluation.evaluate, the
scores from measures. The flags that decide the numbers default to those of the run that wrote the model (its
training_args.json); flags given override them. So OUT/best scores the WER the run reported for it.
"""
import argparse
import itertools
import json
import os
import re
import sys
import time

import torch

from captioning import checkpoint, cli, coco_eval, decode, evaluation, flags, image_cache, runtime, sources, training
from captioning.errors import DataError, ModelLoadError
from captioning.gitmodel import load_model, resolve_model
from captioning.hub import looks_like_path, offline_unless_needed
from captioning.measures import collapse_warning, evaluation_scores
from captioning.presets import SYNTHETIC


def note(message):
    """A line for the user, on stderr: stdout holds the scores alone."""
    print(message, file=sys.stderr, flush=True)


def score_model(given):
    """metrics.py --model: the scores train.py's evaluation gives the model, on the split asked for."""
    folder = model_folder(given.model)
    settings, inherited = scoring_settings(given, folder, *run_args(folder))
    split = getattr(given, "split", "eval")
    offline_unless_needed(*[n for n in (folder, settings.dataset) if n != SYNTHETIC])  # before datasets loads
    training.quiet_libraries()
    device, amp_dtype = device_and_precision(settings)
    table = split_table(settings, split)
    model, processor = load_for_scoring(folder, settings, device)
    if inherited:  # once the data and model are found: a bad input stays a one-line error
        note(inherited)
    pixels, references, labels = prepare(settings, table, split, processor)
    loader = evaluation.make_eval_loader(settings, pixels, references, processor, device)
    t0 = time.time()
    eval_loss, predictions = evaluation.evaluate(model, processor, loader, device, amp_dtype, settings.gen_max_length,
                                            num_beams=settings.eval_num_beams)
    scores = {**evaluation_scores(predictions, references), "eval_loss": eval_loss, "images": len(predictions)}
    note(f"{folder}: {len(predictions)} images of the {split} split of {settings.dataset!r} | "
         f"generate(max_length={settings.gen_max_length}, num_beams={settings.eval_num_beams}) | {device} "
         f"{'fp32' if amp_dtype is None else str(amp_dtype).split('.')[-1]} | {time.time() - t0:.1f}s")
    warning = collapse_warning(predictions, references)
    if warning:
        note(warning)
    if settings.coco_eval:
        scores.update(coco_eval.coco_table(predictions, references, note))
    if hasattr(given, "output"):
        write_predictions(given.output, labels, predictions, references)
    print_scores(scores, given.json)
    return 0


def print_scores(scores, as_json):
    if as_json:
        print(json.dumps(scores))
    else:
        print("\n".join(f"{name} {value:.6f}" if isinstance(value, float) else f"{name} {value}"
                        for name, value in scores.items()))


def model_folder(name):
    """--model as it is loaded: a train.py output folder means its best/; a Hub id stays as it is."""
    if looks_like_path(name) and not os.path.isdir(name):
        cli.fail(f"--model {name!r}: no such folder")
    return resolve_model(name)


def run_args(folder):
    """(the flags of the run that wrote the model, the file they are in), or ({}, None). A best/ or
    checkpoint written before best/ carried its own copy falls back to the run folder's."""
    paths = [os.path.join(folder, "training_args.json")]
    if re.fullmatch(r"best|checkpoint-\d+", os.path.basename(os.path.normpath(folder))):
        paths.append(os.path.join(os.path.dirname(os.path.normpath(folder)), "training_args.json"))
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            cli.fail(f"{path}: not readable as JSON ({getattr(e, 'strerror', None) or e})")
        if not isinstance(saved, dict):
            cli.fail(f"{path}: not a JSON object of train.py's flags")
        return saved, path
    return {}, None


def scoring_settings(given, folder, saved, source):
    """(train.py's flags as its evaluation saw them: its defaults, overridden by the run's, then by those
    given; a line saying which came from the run, or None)."""
    settings = vars(flags.parse_args([]))
    inherited = {k: saved[k] for k in flags.FROM_THE_RUN if k in saved and k not in vars(given)}
    settings.update(inherited)
    settings.update(vars(given))
    if "dataset" not in vars(given) and "dataset" not in inherited:
        cli.fail(f"--dataset is needed: {folder} has no training_args.json to take the run's from")
    shown = [flag_text(k, v) for k, v in inherited.items() if v is not None]
    line = f"from the run's {source}: {' '.join(shown)} (flags given override these)" if shown else None
    return argparse.Namespace(**settings), line


def flag_text(name, value):
    flag = flags.flag_name(name)
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"


def device_and_precision(settings):
    try:
        device = runtime.pick_device(settings.device)
    except ValueError as e:
        cli.fail(str(e))
    return device, runtime.pick_precision(settings.precision, device)[0]


def load_for_scoring(folder, settings, device):
    try:
        model, processor = load_model(folder, trust_remote_code=settings.trust_remote_code,
                                      attention=runtime.pick_attention(settings.attention, device))
    except ModelLoadError as e:
        cli.fail(str(e))
    # Laid out as training holds it (training.load_data_and_model), so the convolution adds up the same way.
    model.to(device, memory_format=torch.channels_last)
    return model, processor


def split_table(settings, split):
    """The table --split names: eval and train as train.py splits the source (sources.load_tables), any
    other name a split of the source itself."""
    try:
        if split in ("eval", "train"):
            train_table, eval_table = sources.load_tables(settings)
            return eval_table if split == "eval" else train_table
        source = sources.source_of(settings)
        names = list(source) if isinstance(source, dict) else []
        if split not in names:
            own = f"its splits are {', '.join(names)}" if names else "it has no named splits"
            cli.fail(f"--split {split!r}: {settings.dataset!r} has no split of that name ({own}); eval is the "
                     f"held-out split train.py evaluates on, train the one it trains on")
        sources.check_columns(source[split], settings.image_column, settings.text_column, split)
        return source[split]
    except DataError as e:
        cli.fail(str(e))


def prepare(settings, table, what, processor):
    """(uint8 pixels, references, image labels) of the table's usable rows, through train.py's image cache."""
    cache_dir = None if settings.no_cache else os.path.expanduser(settings.cache_dir)
    draft = None if settings.exact_preprocessing else decode.draft_size(processor.image_processor)
    skipped = []  # as train.py's default --on-bad-sample skip: the rows it evaluated on
    try:
        pixels, references = image_cache.prepare_split(table, settings.image_column, settings.text_column, what,
                                                   processor.image_processor, skipped, cache_dir, draft=draft,
                                                   num_workers=settings.preprocessing_num_workers, notify=note,
                                                   max_pixels=settings.max_image_pixels)
    except DataError as e:
        cli.fail(str(e))
    except OSError as e:
        cli.fail(f"--cache-dir {cache_dir!r}: {e.strerror or e} (or pass --no-cache)")
    if skipped:
        note(f"skipped {len(skipped)} bad rows, as train.py does; the first: {skipped[0]}")
    if not references:
        cli.fail(f"no usable rows in the {what} split of {settings.dataset!r}")
    return pixels, references, image_labels(table, settings.image_column, skipped, len(references))


def image_labels(table, image_column, skipped, kept):
    """Each kept row's image: its file path, or "row i" for an image held in the table itself."""
    left_out = {int(m.group(1)) for m in (re.search(r"\brow (\d+)", line) for line in skipped) if m}
    labels, cells = [], sources.undecoded(table, image_column).select_columns([image_column])
    for start, batch in zip(itertools.count(0, 256), cells.iter(batch_size=256)):
        labels += [sources.image_cell(cell, i)[0] for i, cell in enumerate(batch[image_column], start)
                   if i not in left_out]
    return labels if len(labels) == kept else [f"item {k}" for k in range(kept)]


def write_predictions(path, labels, predictions, references):
    rows = (json.dumps({"image": label, "caption": caption, "references": refs}) + "\n"
            for label, caption, refs in zip(labels, predictions, references))
    try:
        checkpoint.write_file_atomically(path, "".join(rows))
    except OSError as e:
        cli.fail(f"--output {path!r}: {e.strerror or e}")


