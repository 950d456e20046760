"""SCST's pieces (captioning/scst.py) on hand-made batches: one image-encoder pass per image while
sampling K captions, the leave-one-out baseline, the sampled batch's targets up to the end token,
and the loss as minus advantage times each sampled token's log-probability."""
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoProcessor

from captioning import evaluation, flags, scst, sources, synthetic
from captioning.measures import CiderD
from conftest import in_process


def model_and_pixels(model_dir, n=2):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    pixels = processor.image_processor([synthetic.scene(21, i)[0] for i in range(n)], return_tensors="pt")["pixel_values"]
    return model, processor, pixels


def test_k_samples_an_image_run_the_image_encoder_once_an_image_and_draw_from_the_image_s_own_stream(
        no_dropout_model):
    model, _, pixels = model_and_pixels(no_dropout_model, n=3)
    encoded = []
    # the patch embedding: where the encoder's work on each image starts
    patches = model.git.image_encoder.vision_model.embeddings
    hook = patches.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    ids = scst.sample(model, pixels, 4, 12, scst.image_generators(7, 0, [10, 11, 12], "cpu"))
    assert encoded == [3] and ids.shape[0] == 12  # 3 images encoded once, 4 samples each
    assert model.git.image_encoder.forward.__func__ is type(model.git.image_encoder).forward  # put back
    encoded.clear()
    # Image 12's draws do not depend on the images beside it (another batch, another rank), only on
    # (seed, epoch, image): alone in its batch it gets the same 4 captions.
    alone = scst.sample(model, pixels[2:], 4, 12, scst.image_generators(7, 0, [12], "cpu"))
    hook.remove()
    assert torch.equal(alone, ids[8:, :alone.shape[1]]) and (ids[8:, alone.shape[1]:] == 0).all()
    assert len({tuple(row.tolist()) for row in ids}) > 1  # sampled, not greedy
    other_epoch = scst.sample(model, pixels[2:], 4, 12, scst.image_generators(7, 1, [12], "cpu"))
    assert not torch.equal(other_epoch, alone)


def test_gumbel_noise_turns_argmax_into_a_draw_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    noise = scst.GumbelNoise(scst.image_generators(0, 0, [5], "cpu"), 20_000)
    draws = noise(None, logits.expand(20_000, -1)).argmax(dim=1)
    share = torch.bincount(draws, minlength=5).float() / 20_000
    # 20,000 draws: each share within 0.012 of its probability (over 4 standard deviations)
    torch.testing.assert_close(share, logits[0].softmax(0), atol=0.012, rtol=0)


def test_leave_one_out_baseline_and_greedy_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(scst.baselines(rewards), torch.tensor([[2.5, 2.0, 1.5], [1.5, 1.5, 0.0]]))
    torch.testing.assert_close(scst.baselines(rewards, "greedy", torch.tensor([1.0, 2.0])),
                               torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        scst.baselines(rewards[:, :1])


def test_rewards_are_each_sample_s_cider_d_against_its_image_s_references(tiny_model_dir):
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    refs = [["a red circle", "a circle"], ["a blue square"], ["a green triangle"]]
    scorer = CiderD(refs)
    texts = ["a red circle", "a blue square", "a blue square", "a circle"]  # 2 images x 2 samples
    ids = tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    got, captions = scst.rewards(tokenizer, ids, refs[:2], scorer, 2)
    assert captions == texts
    expected = [[scorer.score("a red circle", refs[0]), scorer.score("a blue square", refs[0])],
                [scorer.score("a blue square", refs[1]), scorer.score("a circle", refs[1])]]
    torch.testing.assert_close(got, torch.tensor(expected))
    assert got[0, 0] > got[0, 1] and got[1, 0] > got[1, 1]


def test_sampled_batch_targets_end_at_the_first_end_token_and_rows_go_sample_major():
    cls, sep, pad = 101, 102, 0
    ids = torch.tensor([[cls, 5, 6, sep, 7, 7],    # image 0, sample 0: ends at position 3
                        [cls, 8, sep, pad, pad, pad],  # image 0, sample 1 (generate pads after its end)
                        [cls, 9, 9, 9, 9, 9],        # image 1, sample 0: never ended (max_length)
                        [cls, sep, 4, 4, 4, 4]])     # image 1, sample 1: the end token at once
    batch = scst.sampled_batch(ids, torch.zeros(2, 3, 4, 4), 2, sep, pad)
    # rows j * B + i: (image 0, sample 0), (image 1, sample 0), (image 0, sample 1), (image 1, sample 1)
    assert batch["input_ids"].tolist() == [[cls, 5, 6, sep, pad, pad], [cls, 9, 9, 9, 9, 9],
                                           [cls, 8, sep, pad, pad, pad], [cls, sep, pad, pad, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert (batch["labels"] == -100).tolist() == [[m == 0 for m in row] for row in batch["attention_mask"].tolist()]
    assert evaluation.num_targets(batch) == 3 + 5 + 2 + 1  # the end token counts, what follows it does not
    torch.testing.assert_close(scst.image_major_to_rows(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 2, 2),
                               torch.tensor([1.0, 3.0, 2.0, 4.0]))


def test_the_loss_is_minus_advantage_times_each_sampled_token_s_log_probability(no_dropout_model):
    model, processor, pixels = model_and_pixels(no_dropout_model)
    ids = scst.sample(model, pixels, 3, 10, scst.image_generators(5, 0, [0, 1], "cpu"))
    tok = processor.tokenizer
    batch = scst.sampled_batch(ids, pixels, 3, tok.sep_token_id, tok.pad_token_id)
    advantages = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]])
    weights = scst.image_major_to_rows(advantages, 2, 3)
    n = evaluation.num_targets(batch)
    for static in (False, True):
        loss = evaluation.caption_loss(model, batch, n, static=static, row_weights=weights)
        with torch.no_grad():  # by hand: log-softmax at every caption position, the sampled token's entry
            logits = model(pixel_values=pixels, input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            images = logits.shape[1] - batch["input_ids"].shape[1]
            logp = logits[:, images:-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            counted = batch["labels"][:, 1:] != -100
            expected = -(weights[:, None] * logp * counted).sum() / n
        torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


# 89 scenes -> 80 train, 9 eval; 8 images a micro-batch, 2 a step, 3 samples each.
SCST_RUN = ["--dataset", "synthetic", "--synthetic-size", "89", "--batch-size", "8", "--grad-accum", "2",
            "--eval-batch-size", "4", "--learning-rate", "1e-4", "--precision", "fp32", "--max-steps", "4",
            "--logging-steps", "2", "--save-steps", "4", "--eval-steps", "4", "--num-examples", "1",
            "--objective", "scst", "--scst-samples", "3", "--scst-max-length", "20"]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_an_scst_run_samples_with_one_encoder_pass_an_image_logs_its_rewards_and_says_so(trained_run, tmp_path,
                                                                                         monkeypatch):
    from transformers.models.git import modeling_git

    encoded, forward = [], modeling_git.GitVisionEmbeddings.forward

    def counted(self, pixel_values, *args, **kwargs):
        encoded.append((self.training, len(pixel_values)))
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(modeling_git.GitVisionEmbeddings, "forward", counted)
    start, out = os.path.join(trained_run, "best"), tmp_path / "scst"
    proc = in_process("train", *SCST_RUN, "--model", start, "--output-dir", str(out), env=ENV)
    assert proc.returncode == 0, proc.stderr
    # Each step: both micro-batches' 8 images sampled 3 times over with one encoder pass each (eval
    # mode), then the two loss passes (train mode), each encoding its 8 images once for 24 rows.
    assert encoded[:16] == [(False, 8), (False, 8), (True, 8), (True, 8)] * 4
    # the evaluation at step 4: 9 images, each batch encoded for the teacher-forced loss, then by generate
    assert encoded[16:] == [(False, 4)] * 4 + [(False, 1)] * 2
    logged = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(logged) == 2 and all("scst reward" in line and "% distinct" in line for line in logged)
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    for name in ("reward", "baseline", "advantage_spread", "sample_length", "distinct_samples"):
        values = [(e.step, e.value) for e in events.Scalars(f"train/scst_{name}")]
        assert [s for s, _ in values] == [2, 4] and all(v >= 0 for _, v in values), name
    assert 0 < events.Scalars("train/scst_reward")[0].value < 10  # CIDEr-D of a trained model's samples
    assert 1 / 3 <= events.Scalars("train/scst_distinct_samples")[0].value <= 1
    # best/ by CIDEr-D, the default with --objective scst; the card says how it was trained and from what
    assert "best eval cider_d" in proc.stdout
    card = (out / "best" / "README.md").read_text()
    assert f"self-critical sequence training (SCST), starting from `{start}`" in card
    assert "3 captions sampled per image" in card and '"objective": "scst"' in card


def test_scst_s_bad_settings_are_one_line_errors(tmp_path, tiny_model_dir):
    base = [*SCST_RUN, "--model", tiny_model_dir, "--output-dir", str(tmp_path / "run")]
    for extra, says in ((["--scst-samples", "1"], "--scst-samples 1 with --scst-baseline mean"),
                        (["--label-smoothing", "0.1"], "--label-smoothing smooths cross-entropy's targets"),
                        (["--caption-sampling", "all"], "--caption-sampling all: --objective scst")):
        proc = in_process("train", *base, *extra, env=ENV)
        assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, extra
    # One sample an image is fine with the greedy baseline: the flags parse.
    assert flags.parse_args([*base, "--scst-samples", "1", "--scst-baseline", "greedy"]).metric_for_best == "cider_d"

    folder = tmp_path / "scenes"  # captions of punctuation alone: nothing for CIDEr-D to count
    sources.write_imagefolder(synthetic.dataset(20, seed=4), str(folder))
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    for row in rows[::2]:
        row["text"] = "?!"
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # Such a row is a bad row, as in any run: left out and listed, or with --on-bad-sample error one line.
    proc = in_process("train", *base, "--dataset", str(folder), "--no-cache", "--max-steps", "1", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "run" / "skipped.txt").read_text().splitlines()) == 10
    proc = in_process("train", *base, "--dataset", str(folder), "--no-cache", "--on-bad-sample", "error",
                      "--output-dir", str(tmp_path / "strict"), env=ENV)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "caption '?!' in column 'text' has no words" in err[0], err
    # SelfCritic itself, given references straight from Python, names the image it cannot reward.
    args = flags.parse_args(base)
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    with pytest.raises(ValueError, match=r"training image 1 has no reference caption with a word in it \(\['\?!'\]\)"):
        scst.SelfCritic([["a red circle"], ["?!"]], tokenizer, tokenizer.sep_token_id, args)


def test_scst_with_fp16_and_a_frozen_image_encoder(trained_run, tmp_path):
    """fp16 autocast + GradScaler (the CUDA default, on the CPU here) and --freeze-vision under SCST: the
    samples' loss trains the text side while the image encoder's weights stay bit-identical."""
    from safetensors.torch import load_file

    start, out = os.path.join(trained_run, "best"), tmp_path / "scst"
    argv = [*SCST_RUN, "--model", start, "--output-dir", str(out), "--precision", "fp16", "--freeze-vision",
            "--max-steps", "2", "--save-steps", "2", "--eval-steps", "2", "--batch-size", "4"]
    proc = in_process("train", *argv, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "fp16" in proc.stdout and "scst reward" in proc.stdout
    before, after = load_file(os.path.join(start, "model.safetensors")), load_file(str(out / "checkpoint-2" / "model.safetensors"))
    vision = [k for k in before if k.startswith("git.image_encoder.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("git.encoder."))
    state = torch.load(out / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler ran and its state is kept for a resume
