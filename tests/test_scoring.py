"""metrics.py --model: a saved model scored as train.py's evaluation scores it; beam search at
evaluation; the warning for a model that writes one caption for every image."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from conftest import ROOT, TRAINED_RUN, in_process
from captioning import flags, measures, sources

def score(*args):
    return in_process("metrics", *args, cwd=ROOT)


def scored(*args):
    out = score(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def best_evaluation(run_dir):
    """The evaluation best/ holds: the lowest WER, the earlier of equal ones."""
    return min(rows(os.path.join(run_dir, "metrics.jsonl")), key=lambda h: (h["wer"], h["step"]))


@pytest.fixture(scope="module")
def greedy(trained_run, tmp_path_factory):
    """metrics.py on the trained run's best/, every setting from its training_args.json: (scores, rows, stderr)."""
    output = tmp_path_factory.mktemp("greedy") / "predictions.jsonl"
    scores, err = scored("--model", os.path.join(trained_run, "best"), "--dataset", "synthetic", "--output", output)
    return scores, rows(output), err


# ---------------------------------------------------------------------------------------------
# Scoring a checkpoint

def test_best_scores_what_the_run_reported_for_it(trained_run, greedy):
    scores, predictions, err = greedy
    reported = best_evaluation(trained_run)
    assert scores["wer"] == pytest.approx(reported["wer"], abs=1e-4)
    for name in ("cer", "bleu4", "rouge_l", "cider_d", "distinct_captions", "eval_loss"):
        assert scores[name] == pytest.approx(reported[name], abs=1e-4), name
    assert scores["images"] == 100
    # the settings that matter came from best/training_args.json, which holds the run's flags
    saved = json.load(open(os.path.join(trained_run, "best", "training_args.json")))
    assert saved == json.load(open(os.path.join(trained_run, "training_args.json")))
    line = next(line for line in err.splitlines() if line.startswith("from the run's"))
    assert "best/training_args.json" in line and "--synthetic-size 1000" in line and "--precision auto" in line
    assert "--dataset" not in line  # given, so not taken from the run
    assert "collapsed" not in err  # a model that looks at its images


def test_the_run_s_attention_is_the_one_scored_with(trained_run, tmp_path, monkeypatch):
    """A run trained with --attention eager on a GPU (where auto is sdpa) is scored with eager there:
    the attention comes from the run, as the other flags that decide the numbers do."""
    from captioning import scoring

    folder = tmp_path / "best"
    shutil.copytree(os.path.join(trained_run, "best"), folder)
    saved = json.loads((folder / "training_args.json").read_text())
    (folder / "training_args.json").write_text(json.dumps({**saved, "attention": "sdpa"}))
    asked, load_model = [], scoring.load_model
    monkeypatch.setattr(scoring, "load_model", lambda *a, **k: asked.append(k["attention"]) or load_model(*a, **k))
    _, err = scored("--model", folder, "--max-length", "5")
    assert asked == ["sdpa"]
    assert "--attention sdpa" in next(line for line in err.splitlines() if line.startswith("from the run's"))
    _, err = scored("--model", folder, "--max-length", "5", "--attention", "eager")  # a flag given wins
    assert asked == ["sdpa", "eager"] and "--attention" not in err


def test_output_holds_each_prediction_with_its_references(trained_run, greedy):
    scores, predictions, _ = greedy
    args = flags.parse_args([*TRAINED_RUN, "--output-dir", trained_run])
    eval_table = sources.load_tables(args)[1]
    assert [p["references"] for p in predictions] == [[t] for t in eval_table["text"]]
    assert [p["image"] for p in predictions] == [f"row {i}" for i in range(100)]
    captions = [p["caption"] for p in predictions]
    assert measures.evaluation_scores(captions, [p["references"] for p in predictions]) == \
        pytest.approx({k: v for k, v in scores.items() if k not in ("eval_loss", "images")})


def test_split_names_a_split_of_the_source(tmp_path, tiny_model_dir):
    import datasets
    from captioning import synthetic

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": synthetic.dataset(20, 1), "validation": synthetic.dataset(10, 2),
                          "test": synthetic.dataset(12, 3)}).save_to_disk(folder)
    common = ("--model", tiny_model_dir, "--dataset", folder, "--max-length", "5", "--precision", "fp32")
    assert scored(*common, "--split", "test")[0]["images"] == 12
    out = score(*common, "--split", "val")
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"error: --split 'val': '{folder}' has no split of that name (its splits are train, validation, test); "
        f"eval is the held-out split train.py evaluates on, train the one it trains on"]


def caption_logprob(model, processor, image, caption):
    """The mean log-probability per generated token (the caption's tokens and [SEP]) of caption given image:
    what beam search ranks finished captions by (length_penalty 1)."""
    pixels = processor(images=image, return_tensors="pt").pixel_values
    ids = processor.tokenizer(caption, return_tensors="pt").input_ids  # [CLS] caption [SEP]
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=pixels).logits[0, -ids.shape[1]:-1].float()
    return logits.log_softmax(-1).gather(1, ids[0, 1:, None]).mean().item()


def test_beam_search_finds_captions_the_model_rates_at_least_as_high(trained_run, greedy, tmp_path):
    output = tmp_path / "beams.jsonl"
    scores, err = scored("--model", trained_run, "--num-beams", "3", "--output", output)  # a run folder: its best/
    beams, (greedy_scores, greedy_rows, _) = rows(output), greedy
    assert "generate(max_length=50, num_beams=3)" in err
    assert len(beams) == 100 and all(b["caption"] for b in beams)
    assert scores["eval_loss"] == pytest.approx(greedy_scores["eval_loss"], abs=1e-6)  # generation alone changed
    changed = [k for k in range(100) if beams[k]["caption"] != greedy_rows[k]["caption"]]
    assert changed  # else this test would not tell beam search from greedy
    model, processor = train_model(trained_run)
    images = sources.load_tables(flags.parse_args([*TRAINED_RUN, "--output-dir", trained_run]))[1]["image"]
    beam_lp = [caption_logprob(model, processor, images[k], beams[k]["caption"]) for k in changed]
    greedy_lp = [caption_logprob(model, processor, images[k], greedy_rows[k]["caption"]) for k in changed]
    # Beam search keeps 3 candidates where greedy keeps 1: where they differ, its captions score higher
    # on the whole (per caption it is a heuristic, and generation ran in bf16, scoring here in fp32).
    assert sum(beam_lp) > sum(greedy_lp), (beam_lp, greedy_lp)
    assert sum(b >= g for b, g in zip(beam_lp, greedy_lp)) >= 0.8 * len(changed)  # measured: 44 of 47


def train_model(run_dir):
    from transformers import AutoModelForCausalLM, AutoProcessor

    best = os.path.join(run_dir, "best")
    return AutoModelForCausalLM.from_pretrained(best).eval(), AutoProcessor.from_pretrained(best)


# ---------------------------------------------------------------------------------------------
# --eval-num-beams in train.py

def test_train_evaluates_with_beams_and_its_card_and_metrics_py_say_so(tmp_path, tiny_model_dir, capsys):
    """Also --coco-eval: the COCO table at each evaluation, in metrics.jsonl, equal to metrics.py's."""
    out = tmp_path / "run"
    train.main(["--dataset", "synthetic", "--synthetic-size", "120", "--model", tiny_model_dir, "--output-dir",
                str(out), "--batch-size", "16", "--grad-accum", "1", "--learning-rate", "1e-3", "--precision", "fp32",
                "--max-steps", "6", "--eval-steps", "3", "--save-steps", "6", "--gen-max-length", "20",
                "--eval-num-beams", "2", "--coco-eval"])
    logged = rows(out / "metrics.jsonl")
    assert [h["step"] for h in logged] == [3, 6] and all(0 < h["distinct_captions"] <= 1 for h in logged)
    assert all({"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(h) for h in logged)
    said = capsys.readouterr().out
    assert len(re.findall(r"eval step \d+: .* \| COCO Bleu_4 [0-9.]+ METEOR [0-9.]+ ROUGE_L [0-9.]+ CIDEr", said)) == 2
    assert said.count("SPICE not computed") <= 1  # said once a run, if at all
    card = (out / "best" / "README.md").read_text()
    assert card.count("max_length=20, num_beams=2") == 2  # the evaluation text and the usage snippet
    assert '"eval_num_beams": 2' in card and '"gen_max_length": 20' in card
    assert json.load(open(out / "best" / "training_args.json"))["eval_num_beams"] == 2
    # metrics.py takes the run's beams, length and precision from best/ and reports what the run did
    scores, err = scored("--model", out / "best", "--coco-eval")
    assert "--num-beams 2" in err and "--max-length 20" in err and "--precision fp32" in err
    assert scores["wer"] == pytest.approx(best_evaluation(out)["wer"], abs=1e-4)
    assert scores["CIDEr"] == pytest.approx(best_evaluation(out)["CIDEr"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# A model that writes one caption for every image

def test_distinct_share_and_the_collapse_rule():
    assert measures.distinct_share(["A cat.", "a cat", "a dog"]) == pytest.approx(2 / 3)
    refs = [f"caption {k}" for k in range(10)]
    assert "1 distinct caption for 10 images" in measures.collapse_warning(["same"] * 10, refs)
    assert measures.collapse_warning(["same"] * 9, refs[:9]) is None  # too few images to judge
    assert "2 distinct captions" in measures.collapse_warning(["same"] * 9 + ["other"], refs)  # 20% of 100%
    assert measures.collapse_warning(["same"] * 8 + refs[:2], refs) is None  # 30%: above a quarter of 100%
    assert measures.collapse_warning(["same"] * 10, [["one", "x"]] * 10) is None  # the references repeat too


@pytest.fixture(scope="module")
def one_caption_model(tiny_model_dir, tmp_path_factory):
    """The tiny GIT with its output bias pushed to one word: it writes that word whatever the image."""
    out = tmp_path_factory.mktemp("one-caption")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    weights = load_file(out / "model.safetensors")
    from transformers import AutoTokenizer

    word = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("circle")
    weights["output.bias"][word] += 100.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_a_model_with_one_caption_is_said_to_have_collapsed(one_caption_model):
    # --split train: the 90 scenes of 100 that train.py would train on (it holds out --test-size 0.1)
    out = score("--model", one_caption_model, "--dataset", "synthetic", "--synthetic-size", "100", "--split", "train",
                "--max-length", "8", "--precision", "fp32")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split() for line in out.stdout.splitlines())
    assert list(lines) == ["wer", "cer", "bleu4", "rouge_l", "cider_d", "distinct_captions", "eval_loss", "images"]
    assert lines["images"] == "90" and float(lines["distinct_captions"]) == pytest.approx(1 / 90, abs=1e-6)
    assert "90 images of the train split of 'synthetic'" in out.stderr
    warning = [line for line in out.stderr.splitlines() if "collapsed" in line]
    assert len(warning) == 1 and "1 distinct caption for 90 images" in warning[0]
    assert "learning rate" in warning[0]
    assert "from the run's" not in out.stderr  # a bare model folder: nothing to take from a run


# ---------------------------------------------------------------------------------------------
# Bad input

def test_bad_input_is_one_line(tmp_path, tiny_model_dir, trained_run):
    best = os.path.join(trained_run, "best")
    small = ("--synthetic-size", "50")
    for args, needle in [(("--model", tmp_path / "missing"), "no such folder"),
                         (("--model", best, "--split", "test", *small), "--split 'test'"),
                         (("--model", best, "--text-column", "caption", *small), "no column 'caption'"),
                         (("--model", tiny_model_dir), "--dataset is needed"),
                         (("--model", best, "--output", tmp_path / "p.csv"), "must end in .jsonl"),
                         (("--model", best, "--references", "r.jsonl"), "one or the other"),
                         (("--num-beams", "2", "--predictions", "p", "--references", "r"), "--num-beams needs --model"),
                         ]:
        out = score(*args)
        assert out.returncode == 2 and out.stdout == "", (args, out.stderr)
        assert len(out.stderr.splitlines()) == 1 and needle in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
