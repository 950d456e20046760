import jiwer
import pytest

from metrics import caption_scores, normalize, wer


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


def test_empty_prediction_counts_all_deletions_and_empty_reference_is_an_error():
    scores = caption_scores(["", "a b"], ["one two three", "a b"])
    assert scores["wer"] == pytest.approx(3 / 5)
    assert scores["cer"] == pytest.approx(len("one two three") / (len("one two three") + 3))
    with pytest.raises(ValueError, match="row 1"):
        caption_scores(["a", "b"], ["a", "  ...  "])


def test_cer_counts_characters():
    assert caption_scores(["abd"], ["abc"])["cer"] == pytest.approx(1 / 3)
