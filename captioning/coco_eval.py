"""The COCO caption evaluation's own table, the numbers papers report: BLEU-1..4, METEOR, ROUGE-L,
CIDEr (which is CIDEr-D) and SPICE, computed by pycocoevalcap itself after its PTB tokenisation.

    coco_table(predictions, references, note) -> {"Bleu_1": ..., "METEOR": ..., "SPICE": ...}

Keys are pycocoevalcap's own names. What cannot run is left out, with one line through `note`
naming the score and why, and the rest is still computed:
- no `java` on PATH: METEOR and SPICE (Java programs), and the PTB tokeniser (also Java), in whose
  place BLEU, ROUGE-L and CIDEr get our own normalisation (measures.py), said in the same line.
- SPICE's Stanford CoreNLP models absent and their download (pycocoevalcap's own, from
  nlp.stanford.edu, about 400 MB, once) failing or past DOWNLOAD_TIMEOUT_S: SPICE. A failure is
  remembered for the process, so that training's later evaluations do not wait for it again.

The Java programs' chatter (pycocoevalcap prints progress on stdout and the tokeniser on stderr) is
kept off this process's stdout, which holds the scores, and shown only when a program fails.
"""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models, spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioning.strings import normalize


NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
DOWNLOAD_TIMEOUT_S = 60
JAVA_PACKAGE = "default-jre-headless"
_spice_unavailable = []  # why SPICE could not run, once found out in this process


class Unavailable(Exception):
    """A score that cannot be computed here; the message says which and why."""


def coco_table(predictions, references, note):
    """pycocoevalcap's scores of predictions[i] against references[i] (a string or a list of strings).
    Rows with no non-blank reference are left out, as measures.caption_scores leaves them out."""
    gts, res = _as_coco(predictions, references)
    if not gts:
        return {}
    java = shutil.which("java") is not None
    if not java:
        note(f"COCO table: METEOR and SPICE not computed: they need Java, not found on PATH (Debian: apt-get "
             f"install {JAVA_PACKAGE}); the PTB tokeniser needs it too, so BLEU, ROUGE-L and CIDEr are computed "
             f"on our normalised words instead and may differ slightly from a paper's")
    try:
        if java:
            gts, res = _ptb_tokenize(gts), _ptb_tokenize(res)
        else:
            gts, res = ({i: [normalize(c["caption"]) for c in caps] for i, caps in d.items()} for d in (gts, res))
        return _scores(gts, res, java, note)
    except (OSError, subprocess.CalledProcessError, RuntimeError, ValueError) as e:
        note(f"COCO table: not computed: pycocoevalcap failed ({e})")
        return {}


def _scores(gts, res, java, note):
    table = {}
    with _quiet():
        bleu, _ = Bleu(4).compute_score(gts, res)
    table.update(zip(NAMES[:4], bleu))
    if java:
        table["METEOR"] = _meteor(gts, res)
    table["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    table["CIDEr"] = Cider().compute_score(gts, res)[0]
    if java:
        try:
            table["SPICE"] = _spice(gts, res)
        except Unavailable as e:
            note(f"COCO table: SPICE not computed: {e}")
    return {name: float(table[name]) for name in NAMES if name in table}


def _as_coco(predictions, references):
    """({row: [{"caption": reference}, ...]}, {row: [{"caption": prediction}]}) as pycocoevalcap takes them."""
    gts, res = {}, {}
    for row, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        # METEOR's protocol separates fields with |||: one inside a caption would shift every field after it
        refs = [r.replace("|||", " ") for r in refs if normalize(r)]
        if refs:
            gts[row] = [{"caption": r} for r in refs]
            res[row] = [{"caption": prediction.replace("|||", " ")}]
    return gts, res


@contextlib.contextmanager
def _quiet(show_on_failure=True):
    """Send what is written to stdout and stderr (Python's and the Java child processes') to a file,
    shown on stderr if the block fails (and show_on_failure)."""
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        except BaseException:
            _restore(saved)
            if show_on_failure:
                log.seek(0)
                sys.stderr.write(log.read()[-4000:])
            raise
        else:
            _restore(saved)


def _restore(saved):
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)


def _ptb_tokenize(captions):
    with _quiet():
        tokenized = PTBTokenizer().tokenize(captions)
    # pycocoevalcap pairs its output lines with the captions in order: a line lost would shift them all
    if [len(v) for v in tokenized.values()] != [len(v) for v in captions.values()]:
        raise RuntimeError("pycocoevalcap's PTB tokeniser returned a different number of captions than it was given")
    return tokenized


def _meteor(gts, res):
    with _quiet():
        scorer = Meteor()
        try:
            return scorer.compute_score(gts, res)[0]
        finally:
            scorer.meteor_p.kill()  # its own __del__ would wait for the garbage collector
            scorer.meteor_p.wait()


def _spice(gts, res):
    if _spice_unavailable:
        raise Unavailable(_spice_unavailable[0])
    jar = os.path.join(os.path.dirname(get_stanford_models.__file__), get_stanford_models.SPICELIB,
                       f"{get_stanford_models.JAR}.jar")
    previous = socket.getdefaulttimeout()
    try:
        if not os.path.exists(jar):
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urlretrieve has no timeout of its own
            with _quiet(show_on_failure=False):  # the reason is in the line below
                get_stanford_models.get_stanford_models()
        with _quiet():
            return spice.Spice().compute_score(gts, res)[0]
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        reason = (f"it needs Stanford CoreNLP {get_stanford_models.JAR}, which pycocoevalcap downloads from "
                  f"nlp.stanford.edu on first use, and the download failed ({e})" if not os.path.exists(jar)
                  else f"pycocoevalcap's SPICE failed ({e})")
        _spice_unavailable.append(reason)
        raise Unavailable(reason) from None
    finally:
        socket.setdefaulttimeout(previous)
