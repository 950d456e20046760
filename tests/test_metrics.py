import json
import math
import os
import re
import subprocess
import sys

import jiwer
import pytest

import metrics
from captioning import measures
from captioning.measures import caption_scores, wer
from captioning.strings import normalize

METRICS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metrics.py")


def test_wer_counts_edits_over_reference_words():
    # ref 1: "a red circle" vs "a blue circle": 1 substitution; ref 2: "small square" vs
    # "small square here": 1 insertion. 2 edits / 5 reference words.
    assert wer(["a blue circle", "small square here"], ["a red circle", "small square"]) == pytest.approx(2 / 5)


def test_wer_is_corpus_level_like_evaluate():
    preds = ["the cat sat", "a dog", "one two three four", "x"]
    refs = ["the cat sat down", "a big dog", "one two three", "y z"]
    # evaluate's "wer" is jiwer's corpus WER over all pairs; ours must be the same number.
    assert wer(preds, refs) == pytest.approx(jiwer.wer(refs, preds))


def test_normalisation_applies_to_both_sides():
    assert normalize("  A Pikachu,  with RED cheeks!") == "a pikachu with red cheeks"
    assert wer(["A red Circle."], ["a red circle"]) == 0.0


def test_several_references_use_the_closest():
    refs = [["a green square on the left", "a red circle"]]
    assert wer(["a red circle"], refs) == 0.0
    # closest is "a red circle" (1 substitution over 3 words), not the 6-word one
    assert wer(["a red square"], refs) == pytest.approx(1 / 3)


def test_empty_prediction_counts_all_deletions():
    scores = caption_scores(["", "a b"], ["one two three", "a b"])
    assert scores["wer"] == pytest.approx(3 / 5)
    assert scores["cer"] == pytest.approx(len("one two three") / (len("one two three") + 3))


def test_references_without_words_are_ignored_and_rows_left_without_any_are_not_scored():
    unscored = []
    scores = caption_scores(["a red circle", "b", "a blue square", "c"],
                            ["a red circle", "  ...  ", ["a green square", "!!!", ""], ["¡¿", "?"]], unscored)
    assert unscored == [1, 3]  # rows 1 and 3 have no reference left; their predictions count nowhere
    scored_alone = caption_scores(["a red circle", "a blue square"], ["a red circle", ["a green square"]])
    assert scores == pytest.approx(scored_alone)
    assert scores["wer"] == pytest.approx(1 / 6)  # one substitution over 3 + 3 reference words
    nothing = []
    assert caption_scores(["a", "b"], ["...", "!!!"], nothing) == dict.fromkeys(
        ["wer", "cer", "bleu4", "rouge_l", "cider_d"], 0.0)
    assert nothing == [0, 1]


def test_cer_counts_characters():
    assert caption_scores(["abd"], ["abc"])["cer"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# BLEU-4, ROUGE-L, CIDEr-D

def test_identical_caption_scores_one_and_unrelated_scores_zero():
    same = caption_scores(["A red circle on the left."], ["a red circle on the left"])
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    none = caption_scores(["big blue square"], ["a red circle on the left"])
    assert none["bleu4"] == 0.0 and none["rouge_l"] == 0.0 and none["cider_d"] == 0.0


def test_bleu_uses_every_reference_and_pads_missing_ones():
    # the 4-gram "a red circle on" is only in the second reference of image 0; image 1 has one reference
    refs = [["one two three four five", "a red circle on the left"], ["small green square near top"]]
    scores = caption_scores(["a red circle on the left", "small green square near top"], refs)
    assert scores["bleu4"] == pytest.approx(1.0)


def test_rouge_l_by_hand():
    # LCS("a red square", "a red circle") = 2: precision 2/3, recall 2/3, so F = 2/3 whatever beta
    assert caption_scores(["a red square"], [["a red circle"]])["rouge_l"] == pytest.approx(2 / 3)
    # precision 1 (from "a red"), recall 2/3: F = (1 + b^2) P R / (R + b^2 P) with b = 1.2
    p, r, b2 = 1.0, 2 / 3, 1.44
    assert caption_scores(["a red"], [["a red circle"]])["rouge_l"] == pytest.approx((1 + b2) * p * r / (r + b2 * p))


def test_empty_input_scores_zero():
    assert caption_scores([], []) == dict.fromkeys(["wer", "cer", "bleu4", "rouge_l", "cider_d"], 0.0)


# Several images, varying numbers of references, repeated words, a 1-word and an empty prediction.
PREDS = ["A red circle on the left!", "two blue squares, two blue squares", "a green triangle",
         "", "circle", "a small yellow star above a red circle", "a red circle on the left"]
REFS = [["a red circle on the left", "red circle at left side", "a circle that is red"],
        ["two blue squares next to each other"],
        ["a green triangle at the bottom", "green triangle", "a triangle coloured green", "triangle"],
        ["a purple hexagon"],
        ["a big circle", "one circle in the middle"],
        ["a yellow star above a red circle", "star and circle"],
        ["a blue circle on the right", "blue circle right"]]


def test_rouge_l_and_cider_d_match_pycocoevalcap():
    # pycocoevalcap 1.2's Cider is CIDEr-D (clipped, length-penalised, x10); its PTBTokenizer needs Java,
    # so it gets our normalised strings, which it splits on whitespace. It is in requirements-dev.txt;
    # imported here so that without it this test fails instead of skipping the scores' outside check.
    from pycocoevalcap.bleu import bleu
    from pycocoevalcap.cider import cider
    from pycocoevalcap.rouge import rouge

    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [normalize(p)] for i, p in enumerate(PREDS)}
    ours = caption_scores(PREDS, REFS)
    assert ours["rouge_l"] == pytest.approx(rouge.Rouge().compute_score(gts, res)[0], abs=1e-6)
    assert ours["cider_d"] == pytest.approx(cider.Cider().compute_score(gts, res)[0], abs=1e-6)
    # COCO's BLEU adds tiny epsilons to the n-gram counts, sacrebleu does not: equal to 1e-6 all the same
    assert ours["bleu4"] == pytest.approx(bleu.Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-6)
    assert ours["cider_d"] > 0 and ours["bleu4"] > 0


def test_cider_d_with_a_corpus_s_document_frequencies_equals_pycocoevalcap_caption_by_caption():
    """SCST's reward: each sampled caption scored alone against its image's references, with document
    frequencies from the whole training split's references instead of the scored batch's. pycocoevalcap
    takes them from the captions it scores, so it scores one candidate for every image of the corpus."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    corpus = [[normalize(r) for r in refs] for refs in REFS]
    samples = [[normalize(p), normalize(p + " and a circle"), "a"] for p in PREDS]  # three an image
    reward = measures.CiderD(corpus)
    for k in range(3):
        theirs = CiderScorer(n=4, sigma=6.0)
        for image, refs in enumerate(corpus):
            theirs.cook_append(samples[image][k], refs)
        expected = theirs.compute_score()[1]
        ours = [reward.score(samples[image][k], refs) for image, refs in enumerate(corpus)]
        assert ours == pytest.approx(list(expected), abs=1e-9), k
    # The corpus's frequencies, not the batch's: the same caption scored within a batch of two differs.
    alone = measures.CiderD(corpus[:2]).score(samples[0][0], corpus[0])
    assert alone != pytest.approx(reward.score(samples[0][0], corpus[0]))


def test_cider_d_by_hand():
    # Two images, one reference each, no shared n-grams across images: every reference n-gram has
    # IDF log(2) - log(1), so the weights are log 2 times the counts. Image 0 is exact with 4 words:
    # each n = 1..4 gives cosine 1, so 10. Image 1 "b" against "b c": only n=1 has hypothesis n-grams; cosine
    # (log2 * log2) / (log2 * sqrt(2) log2) = 1/sqrt 2, length penalty exp(-1/72), mean over n=1..4 and x10.
    score = caption_scores(["w x y z", "b"], ["w x y z", "b c"])["cider_d"]
    assert score == pytest.approx((10 + 10 * math.exp(-1 / 72) / math.sqrt(2) / 4) / 2)


# ---------------------------------------------------------------------------------------------
# The command line

def run_cli(*args):
    return subprocess.run([sys.executable, METRICS, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_cli_matches_caption_scores(tmp_path):
    preds = [{"image": f"{i}.png", "caption": p, "captions": [p], "error": None} for i, p in enumerate(PREDS)]
    preds[3] = {"image": "3.png", "caption": None, "captions": None, "error": "cannot identify image file"}
    # references as one line with "captions", or split over several lines with "caption"
    refs = []
    for i, rs in enumerate(REFS):
        refs += [{"image": f"{i}.png", "captions": rs}] if i % 2 else [{"image": f"{i}.png", "caption": r} for r in rs]
    refs.append({"image": "unpredicted.png", "caption": "scored as an empty caption"})
    p, r = write_jsonl(tmp_path / "p.jsonl", preds[::-1]), write_jsonl(tmp_path / "r.jsonl", refs)
    expected = caption_scores([*PREDS[::-1], ""], [*REFS[::-1], ["scored as an empty caption"]])
    out = run_cli("--predictions", p, "--references", r, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == pytest.approx(expected)
    assert out.stderr == (f"warning: 1 image of {r} has no prediction in {p}, scored as empty captions: "
                          f"'unpredicted.png'\n")
    out = run_cli("--predictions", p, "--references", r)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert [name for name, _ in lines] == ["wer", "cer", "bleu4", "rouge_l", "cider_d"]
    assert {name: float(v) for name, v in lines} == pytest.approx(expected, abs=1e-6)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": "y"}])
    r = write_jsonl(tmp_path / "r.jsonl", [{"image": "a.png", "caption": "x"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "caption": "x"}, "{not json"])
    # a reference without words is a mistake in the references file here, not a row to leave out
    wordless = write_jsonl(tmp_path / "wordless.jsonl",
                           [{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": "..."}])
    for args, needle in [((p, str(tmp_path / "missing.jsonl")), "missing.jsonl"),
                         ((bad, r), "bad.jsonl:2"),
                         ((p, r), "'b.png'"),
                         ((p, wordless), "wordless.jsonl:2")]:
        out = run_cli("--predictions", args[0], "--references", args[1])
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.splitlines()) == 1 and needle in out.stderr and "Traceback" not in out.stderr
    out = run_cli("--predictions", p)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1


def test_cli_scores_images_without_a_prediction_as_empty_and_names_them(tmp_path):
    # half the images predicted, all correctly: WER 0 if the others were left out
    refs = [{"image": f"{i}.png", "caption": f"scene number {i}"} for i in range(8)]
    preds = [{"image": f"{i}.png", "caption": f"scene number {i}"} for i in range(4)]
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / "r.jsonl", refs)
    out = run_cli("--predictions", p, "--references", r, "--json")
    assert out.returncode == 0, out.stderr
    expected = caption_scores([row["caption"] for row in preds] + [""] * 4, [row["caption"] for row in refs])
    assert json.loads(out.stdout) == pytest.approx(expected) and expected["wer"] == pytest.approx(0.5)
    assert out.stderr == (f"warning: 4 images of {r} have no prediction in {p}, scored as empty captions: "
                          f"'4.png', '5.png', '6.png', ...\n")


def test_cli_refuses_predictions_without_a_reference_counting_and_naming_them(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"image": f"{i}.png", "caption": "x"} for i in range(6)])
    r = write_jsonl(tmp_path / "r.jsonl", [{"image": "1.png", "caption": "x"}])
    out = run_cli("--predictions", p, "--references", r)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: {r}: no reference for 5 images of {p}: '0.png', '2.png', '3.png', ...\n"


def loaded(tmp_path, preds, refs, references_name="r.jsonl"):
    """metrics.load on files of these rows: (predictions, references, the images without a prediction)."""
    unpredicted = []
    p, r = write_jsonl(tmp_path / "p.jsonl", preds), write_jsonl(tmp_path / references_name, refs)
    return (*metrics.load(p, r, unpredicted), unpredicted)


def test_images_match_by_the_end_of_their_path_in_whole_components(tmp_path):
    # infer.py writes the paths it was given; a references file made from an imagefolder holds relative names
    preds = [{"image": "/data/scenes/a/000001.png", "caption": "one"}, {"image": "/data/scenes/000002.png",
             "caption": "two"}, {"image": "000003.png", "caption": "three"}]
    refs = [{"image": "000003.png", "caption": "c"}, {"image": "000002.png", "caption": "b"},
            {"image": "a/000001.png", "caption": "a"}, {"image": "01.png", "caption": "never /x/000001.png"}]
    assert loaded(tmp_path, preds, refs) == (["one", "two", "three", ""],
                                             [["a"], ["b"], ["c"], ["never /x/000001.png"]], ["01.png"])
    with pytest.raises(metrics.InputError, match=r"r.jsonl: no reference for 1 image of .*p.jsonl: '/x/01.png'$"):
        loaded(tmp_path, [{"image": "/x/01.png", "caption": "x"}], [{"image": "1.png", "caption": "x"}])
    # an exact name wins over an ending
    assert loaded(tmp_path, [{"image": "a/1.png", "caption": "x"}], [{"image": "1.png", "caption": "one"},
                  {"image": "a/1.png", "caption": "a one"}])[:2] == (["x", ""], [["a one"], ["one"]])


@pytest.mark.parametrize("preds, refs, problem", [
    (["/x/1.png", "/y/1.png"], ["1.png"], r"r.jsonl: image '1.png' matches two images of .*p.jsonl \('/x/1.png' and "
                                          r"'/y/1.png'\)"),
    (["1.png", "/y/1.png"], ["1.png"], r"r.jsonl: image '1.png' matches two images of .*p.jsonl \('1.png' and "
                                       r"'/y/1.png'\)"),
    (["/x/a/1.png"], ["1.png", "a/1.png"], r"p.jsonl: image '/x/a/1.png' matches 2 images of .*r.jsonl by the end of "
                                           r"its path \('1.png', 'a/1.png'\)"),
], ids=["two predictions, one reference", "an exact and an ending", "two references, one prediction"])
def test_an_ambiguous_match_is_refused_naming_the_image(tmp_path, preds, refs, problem):
    with pytest.raises(metrics.InputError, match=problem):
        loaded(tmp_path, [{"image": i, "caption": "x"} for i in preds], [{"image": i, "caption": "x"} for i in refs])
    out = run_cli("--predictions", tmp_path / "p.jsonl", "--references", tmp_path / "r.jsonl")
    assert out.returncode == 2 and out.stdout == "" and len(out.stderr.splitlines()) == 1
    assert re.search(problem, out.stderr)


def test_an_imagefolders_metadata_jsonl_is_a_references_file(tmp_path):
    folder = tmp_path / "scenes"
    folder.mkdir()
    meta = [{"file_name": "a/1.png", "text": "a red circle"}, {"file_name": "1.png", "text": ["a blue square", "blue"]},
            {"file_name": "2.png", "text": "unused", "caption": "a green star"},  # "caption" wins over "text"
            {"file_name": "3.png", "text": "three"}]
    # f"{folder}/a/1.png" ends with both a/1.png and 1.png: joined with the metadata file's folder it is a/1.png
    preds = [{"image": f"{folder}/a/1.png", "caption": "a red circle"}, {"image": f"{folder}/1.png", "caption": "blue"},
             {"image": "/elsewhere/2.png", "caption": "a green star"}]
    assert loaded(tmp_path, preds, meta, "scenes/metadata.jsonl") == (
        ["a red circle", "blue", "a green star", ""], [["a red circle"], ["a blue square", "blue"], ["a green star"],
                                                      ["three"]], ["3.png"])
    for row, problem in [({"file_name": "4.png", "text": "..."}, '"text" must be a non-empty string or a list'),
                         ({"file_name": "4.png"}, '"text" must be a non-empty string or a list'),
                         ({"text": "a red circle"}, 'expected an object with an "image" or "file_name" string')]:
        with pytest.raises(metrics.InputError, match=f"scenes/metadata.jsonl:5: {re.escape(problem)}"):
            loaded(tmp_path, preds, [*meta, row], "scenes/metadata.jsonl")


def test_model_output_that_cannot_be_written_fails_before_anything_loads(tmp_path):
    not_a_model = tmp_path / "not-a-model"  # an empty folder: loading it would fail, later, with another line
    not_a_model.mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.jsonl").mkdir()
    for output, problem in [(tmp_path / "missing" / "p.jsonl", f"no such folder '{tmp_path / 'missing'}'"),
                            (tmp_path / "file" / "p.jsonl", f"'{tmp_path / 'file'}' is not a folder"),
                            (tmp_path / "folder.jsonl", "is a folder")]:
        out = run_cli("--model", not_a_model, "--dataset", "synthetic", "--output", output)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == f"error: --output '{output}': {problem}\n"
    ok = tmp_path / "ok"
    ok.mkdir()
    metrics.check_output(str(ok / "p.jsonl"))  # creates and removes the temporary file write_predictions uses
    assert os.listdir(ok) == []


# ---------------------------------------------------------------------------------------------
# The COCO caption evaluation's table (--coco-eval): pycocoevalcap itself, Java included

# Casing, punctuation and a contraction for the PTB tokeniser to work on; an empty prediction too.
COCO_PREDS = ["A red circle, on the left!", "two blue squares", "the triangle's green", "", "a circle.",
              "A yellow star above a red circle", "a red circle on the left"]


def coco_files(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"image": f"{i}.png", "caption": c} for i, c in enumerate(COCO_PREDS)])
    r = write_jsonl(tmp_path / "r.jsonl", [{"image": f"{i}.png", "captions": refs} for i, refs in enumerate(REFS)])
    return p, r


def test_the_coco_table_equals_pycocoevalcap_run_by_hand(tmp_path):
    """metrics.py --coco-eval against the COCO caption evaluation's own steps, written out here: PTB
    tokenisation of both sides, then its BLEU, METEOR, ROUGE-L and CIDEr scorers. Java is needed
    (make test installs it); offline, SPICE cannot fetch its CoreNLP models and is said missing."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    p, r = coco_files(tmp_path)
    out = run_cli("--predictions", p, "--references", r, "--coco-eval", "--json")
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(REFS)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(COCO_PREDS)})
    expected = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    assert {k: ours[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert 0 < expected["METEOR"] < 1 and expected["Bleu_4"] > 0
    # our own five scores come first and are unchanged
    assert {k: ours[k] for k in measures.NAMES} == pytest.approx(caption_scores(COCO_PREDS, REFS))
    if "SPICE" not in ours:  # no network here: one line says so, nothing else is on stderr
        assert re.fullmatch(r"COCO table: SPICE not computed: it needs Stanford CoreNLP .*download failed .*\n",
                            out.stderr), out.stderr
    # name value lines: the same numbers
    out = run_cli("--predictions", p, "--references", r, "--coco-eval")
    lines = dict(line.split() for line in out.stdout.splitlines())
    assert list(lines)[:5] == list(measures.NAMES) and float(lines["METEOR"]) == pytest.approx(ours["METEOR"], abs=1e-6)


def test_without_java_the_coco_table_names_what_is_missing_and_gives_the_rest(tmp_path):
    """No java on PATH: one line names METEOR and SPICE (and the tokeniser's fallback); BLEU, ROUGE-L and CIDEr
    are pycocoevalcap's on our normalised words."""
    from pycocoevalcap.cider.cider import Cider

    p, r = coco_files(tmp_path)
    out = subprocess.run([sys.executable, METRICS, "--predictions", p, "--references", r, "--coco-eval", "--json"],
                         capture_output=True, text=True, env={**os.environ, "PATH": os.path.dirname(sys.executable)})
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("\n") == 1 and "METEOR and SPICE not computed: they need Java" in out.stderr
    ours = json.loads(out.stdout)
    assert "METEOR" not in ours and "SPICE" not in ours and "Traceback" not in out.stderr
    gts = {i: [normalize(c) for c in refs] for i, refs in enumerate(REFS)}
    res = {i: [normalize(c)] for i, c in enumerate(COCO_PREDS)}
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert {"Bleu_1", "Bleu_4", "ROUGE_L"} <= set(ours)
