"""Score generated captions against references.

    python metrics.py --predictions captions.jsonl --references refs.jsonl          # "name value" lines
    python metrics.py --predictions captions.jsonl --references refs.jsonl --json   # one JSON object
    python metrics.py --model OUT/best [--dataset D] [--split eval|train|NAME] [--num-beams N] [--output p.jsonl]

--model scores a saved model as train.py's evaluation does, with its code (scoring.py): the same
split, generation settings and scores, defaults taken from the run that wrote the model. It also
prints distinct_captions, the eval loss and the number of images.

From Python: `caption_scores(predictions, references)` gives {"wer", "cer", "bleu4", "rouge_l", "cider_d"}
for predictions[i] against references[i] (a string or a list of strings).

One normalisation for every metric, applied alike to predictions and references: `normalize` lower-cases,
removes punctuation (characters that are neither letters, digits, underscore nor whitespace) and
collapses whitespace. So "A Pikachu!" and "a pikachu" match exactly. Tokens are then the
whitespace-separated words of the normalised text. An empty prediction scores as an empty caption.
A reference that is empty after normalisation ("", "...", "!!!") has no words to score against and
is ignored; a row left with no reference is left out of every score (a prediction cannot be wrong
against nothing, and WER would divide by zero words), and its index is appended to `unscored` when
a list is passed. The command line refuses such a reference instead, naming its line: there it is
a mistake in an input file.

WER is corpus-level: the edits (substitutions + deletions + insertions) of all captions added up,
divided by the words of all references added up; the number `evaluate.load("wer")` and
`jiwer.wer(references, predictions)` give on the same strings. CER is the same over characters.
Several references per image: each prediction is scored against its closest reference, the one
with the fewest word edits (ties: the longer reference); CER uses that same reference. An empty
prediction counts as deleting every reference word.

The other three use all references of each image and are on a 0-1 scale, except CIDEr-D:
- bleu4: corpus BLEU-4 by sacrebleu, tokenize="none" (the text is already normalised, so it is split
  on whitespace only), no smoothing (as COCO and NLTK's corpus BLEU), closest reference length for the
  brevity penalty; sacrebleu's 0-100 score divided by 100.
- rouge_l: ROUGE-L as the COCO caption evaluation computes it: per image the LCS precision and the
  LCS recall each maximised over the references, combined as an F-measure with beta=1.2; averaged
  over images.
- cider_d: CIDEr-D as the COCO caption evaluation computes it (its "CIDEr" scorer is CIDEr-D):
  TF-IDF vectors of 1- to 4-grams, IDF from the references of the scored set itself, hypothesis
  weights clipped to the reference's, Gaussian length penalty with sigma=6, averaged over references
  and n, times 10. With a single image every IDF is 0, so is the score: score a set, not one caption.
"""
import argparse
import functools
import json
import math
import os
import re
import sys
from collections import Counter

import cli

_PUNCT = re.compile(r"[^\w\s]")
NAMES = ("wer", "cer", "bleu4", "rouge_l", "cider_d")


def normalize(text):
    return " ".join(_PUNCT.sub("", text.lower()).split())


def caption_scores(predictions, references, unscored=None):
    """{"wer", "cer", "bleu4", "rouge_l", "cider_d"} for predictions[i] against references[i]
    (a string or a list of strings). References empty after normalisation are ignored; the rows left
    with none are not scored, and their indices are appended to `unscored` when it is a list."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    hyps, all_refs = [], []
    for row, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        refs = [r for r in map(normalize, refs) if r]
        if not refs:
            if unscored is not None:
                unscored.append(row)
            continue
        hyps.append(normalize(pred))
        all_refs.append(refs)
    if not hyps:
        return dict.fromkeys(NAMES, 0.0)
    return {**_wer_cer(hyps, all_refs), "bleu4": _bleu4(hyps, all_refs),
            "rouge_l": _rouge_l(hyps, all_refs), "cider_d": _cider_d(hyps, all_refs)}


def _wer_cer(hyps, all_refs):
    word_edits = words = char_edits = chars = 0
    for hyp, refs in zip(hyps, all_refs):
        best = None
        for ref in refs:
            edits = _word_edits(ref, hyp)
            n = len(ref.split())
            if best is None or (edits, -n) < (best[0], -best[1]):
                best = (edits, n, ref)
        word_edits += best[0]
        words += best[1]
        char_edits += _char_edits(best[2], hyp)
        chars += len(best[2])
    return {"wer": word_edits / words, "cer": char_edits / chars}


def _word_edits(ref, hyp):
    if not hyp:
        return len(ref.split())
    import jiwer  # here, not at the top: the command line parses its arguments before heavy imports
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def _char_edits(ref, hyp):
    if not hyp:
        return len(ref)
    import jiwer
    out = jiwer.process_characters(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def wer(predictions, references):
    return caption_scores(predictions, references)["wer"]


def _bleu4(hyps, all_refs):
    import sacrebleu
    # sacrebleu wants one stream per reference position; images with fewer references are padded
    # with None, which it drops (an "" would count as a real, empty reference for the brevity penalty).
    width = max(len(refs) for refs in all_refs)
    streams = [[refs[k] if k < len(refs) else None for refs in all_refs] for k in range(width)]
    bleu = sacrebleu.BLEU(tokenize="none", smooth_method="none", max_ngram_order=4)
    return bleu.corpus_score(hyps, streams).score / 100


def _lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag, row[0] = 0, 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _rouge_l(hyps, all_refs, beta=1.2):
    total = 0.0
    for hyp, refs in zip(hyps, all_refs):
        h = hyp.split()
        if not h:
            continue
        lcs = [(_lcs(h, r.split()), len(r.split())) for r in refs]
        # COCO maximises precision and recall separately over the references, then combines them
        p = max(m / len(h) for m, _ in lcs)
        r = max(m / n for m, n in lcs)
        if p and r:
            total += (1 + beta ** 2) * p * r / (r + beta ** 2 * p)
    return total / len(hyps)


def _ngrams(text, n=4):
    words = text.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _cider_d(hyps, all_refs, n=4, sigma=6.0):
    hyp_counts = [_ngrams(h, n) for h in hyps]
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in all_refs]
    # document frequency: in how many images' reference sets an n-gram occurs
    df = Counter(g for counts in ref_counts for g in set().union(*counts))
    log_images = math.log(len(hyps))

    def tfidf(counts):  # one {ngram: weight} and its norm per n-gram length
        vecs = [{} for _ in range(n)]
        for g, tf in counts.items():
            vecs[len(g) - 1][g] = tf * (log_images - math.log(max(1, df[g])))
        return vecs, [math.sqrt(sum(w * w for w in v.values())) for v in vecs]

    total = 0.0
    for hyp, refs, hc, rcs in zip(hyps, all_refs, hyp_counts, ref_counts):
        hv, hnorm = tfidf(hc)
        score = 0.0
        for ref, rc in zip(refs, rcs):
            rv, rnorm = tfidf(rc)
            penalty = math.exp(-((len(hyp.split()) - len(ref.split())) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                if hnorm[k] and rnorm[k]:
                    # clipping: a hypothesis n-gram earns at most the reference's own weight for it
                    dot = sum(min(w, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, w in hv[k].items())
                    score += penalty * dot / (hnorm[k] * rnorm[k])
        total += 10 * score / (n * len(refs))
    return total / len(hyps)


# ---------------------------------------------------------------------------------------------
# Diversity: a model that writes one caption for every image

# Fewer images than this say too little about diversity to warn on.
MIN_IMAGES_TO_JUDGE = 10
# Warn when the predictions' share of distinct captions is below this fraction of the references'.
# A half would flag models that do look at their images: the tests' tiny GIT after 300-500 steps writes
# 31-43 distinct captions for 100 scenes whose references have 96 (WER 0.72-0.45), where after 100
# steps it wrote 2.
COLLAPSE_RATIO = 0.25


def distinct_share(captions):
    """Distinct captions (after normalize) over captions: 1.0 when all differ, 1/n when all are one."""
    return len({normalize(c) for c in captions}) / len(captions) if captions else 0.0


def evaluation_scores(predictions, references):
    """caption_scores plus distinct_captions: what train.py logs at each evaluation and metrics.py --model prints."""
    return {**caption_scores(predictions, references), "distinct_captions": distinct_share(predictions)}


def collapse_warning(predictions, references):
    """One line when the predictions are far less varied than the references, else None.

    Judged against the first reference of each image, not against 1.0, so that a dataset whose
    captions repeat (many images of one kind) does not look like a collapsed model."""
    n = len(predictions)
    if n < MIN_IMAGES_TO_JUDGE:
        return None
    ours = distinct_share(predictions)
    theirs = distinct_share([refs if isinstance(refs, str) else refs[0] for refs in references])
    if ours >= COLLAPSE_RATIO * theirs:
        return None
    distinct = round(ours * n)
    return (f"warning: the model may have collapsed: {distinct} distinct caption{'s' * (distinct != 1)} for "
            f"{n} images ({ours:.0%}, the references {theirs:.0%}); likely a learning rate too high, or too few "
            f"steps for it to start looking at the images")


# ---------------------------------------------------------------------------------------------
# The command line

class InputError(Exception):
    pass


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
    # Absent unless given, so that what was not given can come from the run's training_args.json.
    group = p.add_argument_group("scoring a model on a dataset, as train.py evaluates (defaults: the model "
                                 "folder's training_args.json, else train.py's defaults)")
    m = functools.partial(group.add_argument, default=argparse.SUPPRESS)
    m("--model", help="a save_pretrained folder (OUT/best, OUT/checkpoint-N), a train.py output folder "
                      "(its best/), or a Hub id")
    m("--dataset", help="as train.py's --dataset")
    m("--split", help="eval (default: the held-out split train.py evaluates on), train (the split it trains "
                      "on), or a split of the source by name (test, validation...)")
    m("--output", help="also write predictions.jsonl: one {image, caption, references} per image")
    m("--num-beams", dest="eval_num_beams", metavar="N", type=cli.positive_int, help="beams for generate (1: greedy)")
    m("--max-length", dest="gen_max_length", metavar="N", type=cli.positive_int, help="max_length for generate")
    for flag in ("--image-column", "--text-column", "--image-root", "--cache-dir"):
        m(flag)
    m("--test-size", type=cli.fraction)
    m("--seed", type=int)
    m("--synthetic-size", type=cli.positive_int)
    m("--eval-batch-size", "--batch-size", dest="eval_batch_size", metavar="N", type=cli.positive_int)
    m("--precision", choices=cli.PRECISIONS)
    m("--attention", choices=cli.ATTENTIONS, help=cli.ATTENTION_HELP)
    m("--device", choices=cli.DEVICES)
    m("--num-workers", type=cli.non_negative_int)
    m("--preprocessing-num-workers", type=cli.positive_int)
    m("--no-cache", action="store_true")
    m("--exact-preprocessing", action=argparse.BooleanOptionalAction)
    m("--max-text-length", type=cli.positive_int)
    m("--max-image-pixels", type=cli.non_negative_int, help=cli.MAX_IMAGE_PIXELS_HELP)
    m("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    model_flags = sorted(set(vars(args)) - {"predictions", "references", "json"})
    if hasattr(args, "model"):
        if args.predictions or args.references:
            p.error("--model scores a model; --predictions and --references score caption files: give one or the other")
        if not getattr(args, "output", ".jsonl").endswith(".jsonl"):
            p.error(f"--output {args.output!r}: the file name must end in .jsonl")
    elif not (args.predictions and args.references):
        p.error("give --predictions and --references (score caption files), or --model (score a model on a dataset)")
    elif model_flags:
        p.error(f"{flag_name(model_flags[0])} needs --model")
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


FLAG_NAMES = {"gen_max_length": "--max-length", "eval_num_beams": "--num-beams"}  # ours, where they differ


def flag_name(name):
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def main(argv=None):
    args = parse_args(argv)
    if hasattr(args, "model"):
        import scoring

        return scoring.score_model(args)
    unpredicted = []
    try:
        scores = caption_scores(*load(args.predictions, args.references, unpredicted))
    except InputError as e:
        cli.fail(str(e))
    if unpredicted:
        n = len(unpredicted)
        print(f"warning: {n} image{'s' * (n != 1)} of {args.references} ha{'ve' if n != 1 else 's'} no prediction in "
              f"{args.predictions}, scored as empty captions: {shown_names(unpredicted)}", file=sys.stderr)
    if args.json:
        print(json.dumps(scores))
    else:
        print("\n".join(f"{name} {scores[name]:.6f}" for name in NAMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
