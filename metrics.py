"""Score generated captions against references.

    python metrics.py --predictions captions.jsonl --references refs.jsonl          # "name value" lines
    python metrics.py --predictions captions.jsonl --references refs.jsonl --json   # one JSON object
    python metrics.py --model OUT/best [--dataset D] [--split eval|train|NAME] [--num-beams N] [--output p.jsonl]
    python metrics.py ... --coco-eval    # also the COCO caption evaluation's table (pycocoevalcap, Java)

--model scores a saved model as train.py's evaluation does, with its code (scoring.py): the same
split, generation settings and scores, defaults taken from the run that wrote the model. It also
prints distinct_captions, the eval loss and the number of images.

The scores themselves, and how each is computed, are described in captioning/measures.py.
"""
import argparse
import functools
import json
import os
import sys

from captioning import cli, flags
from captioning.strings import normalize


# ---------------------------------------------------------------------------------------------
# The command line

class InputError(Exception):
    pass


# train.py's flags that --model takes too, declared as train.py declares them (types, choices, help),
# with ours where they differ: the generation flags named as infer.py names them, and
# --no-exact-preprocessing to score a model without the exact preprocessing its run trained with.
AS_IN_TRAINING = {
    "dataset": {}, "image_column": {}, "text_column": {}, "image_root": {}, "cache_dir": {}, "test_size": {},
    "seed": {}, "synthetic_size": {}, "precision": {}, "attention": {}, "device": {}, "num_workers": {},
    "preprocessing_num_workers": {}, "no_cache": {}, "max_text_length": {}, "max_image_pixels": {},
    "trust_remote_code": {},
    "eval_batch_size": dict(names=("--eval-batch-size", "--batch-size"), metavar="N"),
    "eval_num_beams": dict(names=("--num-beams",), metavar="N"),
    "gen_max_length": dict(names=("--max-length",), metavar="N"),
    "exact_preprocessing": dict(action=argparse.BooleanOptionalAction),
}


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    files = p.add_argument_group("scoring caption files")
    files.add_argument("--predictions",
                       help='.jsonl of {"image", "caption"} as infer.py --output writes; a row with an "error" '
                            'counts as empty')
    files.add_argument("--references",
                       help='.jsonl of {"image", "caption"} or {"image", "captions": [...]} (repeated images add '
                            'references), or an imagefolder\'s metadata.jsonl; images match by name or path ending, '
                            'and those without a prediction count as empty')
    p.add_argument("--json", action="store_true", help="print one JSON object instead of name value lines")
    p.add_argument("--coco-eval", action="store_true", help=flags.COCO_EVAL_HELP)
    # Absent unless given, so that what was not given can come from the run's training_args.json.
    group = p.add_argument_group("scoring a model on a dataset, as train.py evaluates (defaults: the model "
                                 "folder's training_args.json, else train.py's defaults)")
    m = functools.partial(group.add_argument, default=argparse.SUPPRESS)
    m("--model", help="a save_pretrained folder (OUT/best, OUT/checkpoint-N), a train.py output folder "
                      "(its best/), or a Hub id")
    m("--split", help="eval (default: the held-out split train.py evaluates on), train (the split it trains "
                      "on), or a split of the source by name (test, validation...)")
    m("--output", help="also write predictions.jsonl: one {image, caption, references} per image")
    train_flags = flags.declarations()
    for dest, ours in AS_IN_TRAINING.items():
        names, kwargs = train_flags[dest]
        m(*ours.get("names", names), **{**kwargs, "dest": dest, "default": argparse.SUPPRESS,
                                        **{k: v for k, v in ours.items() if k != "names"}})
    args = p.parse_args(argv)
    model_flags = sorted(set(vars(args)) - {"predictions", "references", "json", "coco_eval"})
    if hasattr(args, "model"):
        if args.predictions or args.references:
            p.error("--model scores a model; --predictions and --references score caption files: give one or the other")
        if not getattr(args, "output", ".jsonl").endswith(".jsonl"):
            p.error(f"--output {args.output!r}: the file name must end in .jsonl")
    elif not (args.predictions and args.references):
        p.error("give --predictions and --references (score caption files), or --model (score a model on a dataset)")
    elif model_flags:
        p.error(f"{flags.flag_name(model_flags[0])} needs --model")
    return args


def _read_jsonl(path, keys=("image",)):
    """(line number, object) for each non-blank line; each object must name its image by one of `keys`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: {getattr(e, 'strerror', None) or e}")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not JSON: {e.msg}")
        if not isinstance(row, dict) or not any(isinstance(row.get(k), str) for k in keys):
            raise InputError(f"{path}:{number}: expected an object with an {' or '.join(map(json.dumps, keys))} string")
        yield number, row


# How many images a message names before "...": enough to recognise the pattern, one line all the same.
SHOWN_NAMES = 3


def shown_names(names):
    return ", ".join(map(repr, names[:SHOWN_NAMES])) + (", ..." if len(names) > SHOWN_NAMES else "")


def load(predictions_path, references_path, unpredicted=None):
    """(predictions, references) lists: the predictions in file order, each with the references of its image,
    then the images of the references that have no prediction, as empty captions (their names are appended to
    `unpredicted` when a list is passed). An image is matched by its name, else by the end of its path
    (match_images). A prediction without a reference is refused: nothing can score it."""
    preds = {}
    for number, row in _read_jsonl(predictions_path):
        if row["image"] in preds:
            raise InputError(f"{predictions_path}:{number}: image {row['image']!r} predicted twice")
        caption = "" if row.get("error") is not None else row.get("caption")
        if not isinstance(caption, str):
            raise InputError(f'{predictions_path}:{number}: "caption" must be a string')
        preds[row["image"]] = caption
    if not preds:
        raise InputError(f"{predictions_path}: no predictions")
    refs, aliases = _read_references(references_path)
    matched = match_images(list(preds), refs, aliases, predictions_path, references_path)
    orphans = [image for image in preds if image not in matched]
    if orphans:
        raise InputError(f"{references_path}: no reference for {len(orphans)} image{'s' * (len(orphans) != 1)} of "
                         f"{predictions_path}: {shown_names(orphans)}")
    predicted = set(matched.values())
    left = [image for image in refs if image not in predicted]
    if unpredicted is not None:
        unpredicted.extend(left)
    # An image without a prediction is scored as an empty caption, as one that failed in infer.py: leaving it
    # out would let a predictions file missing half the images score WER 0.
    return ([*preds.values(), *[""] * len(left)], [refs[matched[image]] for image in preds] + [refs[r] for r in left])


def _read_references(path):
    """({image: its captions} in file order, {another name of an image: its image}). A line is {"image",
    "caption"} or {"image", "captions": [...]}, or an imagefolder's metadata.jsonl row: "file_name", relative to
    the file's folder (so also named joined with it), and its caption in "text" when there is no "caption(s)"."""
    refs, aliases, folder = {}, {}, os.path.dirname(path)
    for number, row in _read_jsonl(path, ("image", "file_name")):
        in_folder = not isinstance(row.get("image"), str)
        image = row["file_name"] if in_folder else row["image"]
        if "captions" in row or "caption" in row or not in_folder:
            captions = row["captions"] if "captions" in row else [row.get("caption")]
            what = '"caption" must be a non-empty string or "captions" a list of them'
        else:  # the column train.py's --text-column reads by default
            captions = [row.get("text")] if isinstance(row.get("text"), str) else row.get("text")
            what = '"text" must be a non-empty string or a list of them'
        if not isinstance(captions, list) or not all(isinstance(c, str) and normalize(c) for c in captions):
            raise InputError(f"{path}:{number}: {what}")
        refs.setdefault(image, []).extend(captions)
        if in_folder and folder:
            aliases[os.path.join(folder, image)] = image
    return refs, aliases


def match_images(predicted, refs, aliases, predictions_path, references_path):
    """{predicted image: its reference image}. The same name first (a reference's own or an alias); else the
    reference whose path is the end of the prediction's, in whole components: infer.py writes the paths it was
    given (/data/scenes/a/000001.png), a references file made from an imagefolder holds a/000001.png or
    000001.png (never 01.png). An ambiguous match is refused, naming the image."""
    by_path = {}  # a normalised path -> the reference images it names
    for name, image in [*((r, r) for r in refs), *aliases.items()]:
        by_path.setdefault(os.path.normpath(name), set()).add(image)
    matched, claimed = {}, {}
    for p in predicted:
        image = p if p in refs else aliases.get(p)
        if image is None:
            parts = os.path.normpath(p).split("/")
            found = set().union(*(by_path.get("/".join(parts[k:]), ()) for k in range(len(parts))))
            if len(found) > 1:
                raise InputError(f"{predictions_path}: image {p!r} matches {len(found)} images of {references_path} "
                                 f"by the end of its path ({shown_names(sorted(found))}); give the references the "
                                 f"predictions' full paths")
            image = found.pop() if found else None
        if image is None:
            continue
        if image in claimed:
            raise InputError(f"{references_path}: image {image!r} matches two images of {predictions_path} "
                             f"({claimed[image]!r} and {p!r}); give the references the predictions' full paths")
        matched[p], claimed[image] = image, p
    return matched


def check_output(path):
    """Fail unless --output can be written: its folder exists and takes a new file. The temporary file that
    write_predictions will write and rename is created and removed, so a read-only folder shows here too."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        cli.fail(f"--output {path!r}: is a folder")
    if not os.path.isdir(folder):
        cli.fail(f"--output {path!r}: {folder!r} is not a folder" if os.path.exists(folder)
                 else f"--output {path!r}: no such folder {folder!r}")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w"):
            pass
        os.remove(tmp)
    except OSError as e:
        cli.fail(f"--output {path!r}: cannot create a file in {folder!r} ({e.strerror or e})")


def main(argv=None):
    args = parse_args(argv)
    if hasattr(args, "model"):
        if hasattr(args, "output"):  # before anything loads: writing it comes after minutes of generating
            check_output(args.output)
        from captioning import scoring

        return scoring.score_model(args)
    from captioning.measures import caption_scores  # jiwer and sacrebleu: after the flags are checked

    unpredicted = []
    try:
        loaded = load(args.predictions, args.references, unpredicted)
    except InputError as e:
        cli.fail(str(e))
    scores = caption_scores(*loaded)
    if unpredicted:
        n = len(unpredicted)
        print(f"warning: {n} image{'s' * (n != 1)} of {args.references} ha{'ve' if n != 1 else 's'} no prediction in "
              f"{args.predictions}, scored as empty captions: {shown_names(unpredicted)}", file=sys.stderr)
    if args.coco_eval:
        from captioning.coco_eval import coco_table

        scores.update(coco_table(*loaded, note=lambda line: print(line, file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps(scores))
    else:
        print("\n".join(f"{name} {value:.6f}" for name, value in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
