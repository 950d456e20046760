"""Caption scores: WER, CER, BLEU-4, ROUGE-L and CIDEr-D against one or several references, and the
distinct-caption share that warns of a collapsed model.

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
import math
from collections import Counter

import jiwer
import sacrebleu

from captioning.strings import normalize


NAMES = ("wer", "cer", "bleu4", "rouge_l", "cider_d")


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
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def _char_edits(ref, hyp):
    if not hyp:
        return len(ref)
    out = jiwer.process_characters(ref, hyp)
    return out.substitutions + out.deletions + out.insertions


def wer(predictions, references):
    return caption_scores(predictions, references)["wer"]


def _bleu4(hyps, all_refs):
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


def _cider_d(hyps, all_refs):
    """The set's CIDEr-D: document frequencies from the scored set's own references, as COCO's."""
    scorer = CiderD(all_refs)
    return sum(scorer.score(hyp, refs) for hyp, refs in zip(hyps, all_refs)) / len(hyps)


class CiderD:
    """CIDEr-D of one caption against its references (normalised text), with document frequencies
    from a fixed corpus of reference sets: the scored set's own for the COCO score (_cider_d), the
    training split's for a reward computed caption by caption (as self-critical training uses it)."""

    def __init__(self, reference_sets, n=4, sigma=6.0):
        self.n, self.sigma = n, sigma
        # document frequency: in how many images' reference sets an n-gram occurs
        self.df = Counter(g for refs in reference_sets for g in set().union(*(_ngrams(r, n) for r in refs)))
        self.log_images = math.log(len(reference_sets))
        self._reference_vectors = {}  # a reference's weights never change: SCST scores each one K times a step

    def _tfidf(self, text):
        """One {ngram: weight} and its norm per n-gram length."""
        vecs = [{} for _ in range(self.n)]
        for g, tf in _ngrams(text, self.n).items():
            vecs[len(g) - 1][g] = tf * (self.log_images - math.log(max(1, self.df[g])))
        return vecs, [math.sqrt(sum(w * w for w in v.values())) for v in vecs]

    def score(self, hyp, refs):
        hv, hnorm = self._tfidf(hyp)
        score = 0.0
        for ref in refs:
            if ref not in self._reference_vectors:
                self._reference_vectors[ref] = self._tfidf(ref)
            rv, rnorm = self._reference_vectors[ref]
            penalty = math.exp(-((len(hyp.split()) - len(ref.split())) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if hnorm[k] and rnorm[k]:
                    # clipping: a hypothesis n-gram earns at most the reference's own weight for it
                    dot = sum(min(w, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, w in hv[k].items())
                    score += penalty * dot / (hnorm[k] * rnorm[k])
        return 10 * score / (self.n * len(refs))


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
