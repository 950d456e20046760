"""Score generated captions against references.

WER is corpus-level: the edits (substitutions + deletions + insertions) of all captions added up,
divided by the words of all references added up; the number `evaluate.load("wer")` and
`jiwer.wer(references, predictions)` give on the same strings. CER is the same over characters.

Both sides are normalised alike before scoring: lower-cased, punctuation removed (characters that
are neither letters, digits, underscore nor whitespace), whitespace collapsed. So "A Pikachu!" and
"a pikachu" match exactly.

Several references per image: each prediction is scored against its closest reference, the one
with the fewest word edits (ties: the longer reference); CER uses that same reference. An empty
prediction counts as deleting every reference word. An empty reference is an error naming the row.
"""
import re

import jiwer

_PUNCT = re.compile(r"[^\w\s]")


def normalize(text):
    return " ".join(_PUNCT.sub("", text.lower()).split())


def caption_scores(predictions, references):
    """{"wer", "cer"} for predictions[i] against references[i] (a string or a list of strings)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    word_edits = words = char_edits = chars = 0
    for row, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        refs = [normalize(r) for r in refs]
        if not refs or not all(refs):
            raise ValueError(f"row {row}: empty reference caption")
        hyp = normalize(pred)
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
    if words == 0:
        return {"wer": 0.0, "cer": 0.0}
    return {"wer": word_edits / words, "cer": char_edits / chars}


def _word_edits(ref, hyp):
    if not hyp:
        return len(ref.split())
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def _char_edits(ref, hyp):
    if not hyp:
        return len(ref)
    out = jiwer.process_characters(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def wer(predictions, references):
    return caption_scores(predictions, references)["wer"]
