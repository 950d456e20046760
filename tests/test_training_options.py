"""--caption-sampling all, --freeze-vision and --gradient-checkpointing: each computes what it
promises (the same loss, the same gradients, weights left alone) and works through train.py."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoProcessor

from captioning import batches, evaluation, gitmodel, sources, synthetic
import train
from captioning.gitmodel import set_up_for_training

# Three images with 3, 1 and 2 captions: ragged, so an `all` batch needs filler rows.
REFS = [["a red circle", "a small red circle at the top", "there is a red circle"],
        ["a large blue square on the left"],
        ["a green triangle in the center", "a picture of a green triangle"]]


def images(n, first=0):
    return [synthetic.scene(0, first + i)[0] for i in range(n)]


def all_batch(processor, refs, first=0):
    ds = batches.build_dataset(images(len(refs), first), refs, processor, max_text_length=40, all_captions=True)
    ds.set_epoch(0)
    return batches.collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id, ds.mean, ds.std)


def pairs_batch(processor, refs, first=0):
    """The same (image, caption) pairs, one row and one image-encoder pass each."""
    pictures = [img for img, caps in zip(images(len(refs), first), refs) for _ in caps]
    ds = batches.build_dataset(pictures, [[c] for caps in refs for c in caps], processor, max_text_length=40)
    return batches.collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id, ds.mean, ds.std)


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: k + m)


def test_all_captions_of_an_image_take_one_encoder_pass_and_train_as_separate_pairs(no_dropout_model):
    model = AutoModelForCausalLM.from_pretrained(no_dropout_model)
    processor = AutoProcessor.from_pretrained(no_dropout_model)
    encoded = []
    model.git.image_encoder.register_forward_hook(lambda m, inputs, out: encoded.append(inputs[0].shape[0]))

    together, apart = all_batch(processor, REFS), pairs_batch(processor, REFS)
    # 3 images x 3 caption slots; the 3 slots of images with fewer captions are fillers without targets.
    assert together["pixel_values"].shape[0] == 3 and together["input_ids"].shape[0] == 9
    assert evaluation.num_captions(together) == evaluation.num_captions(apart) == 6
    assert (together["labels"][[4, 7, 8]] == -100).all()  # row j * 3 + i is caption j of image i
    n = evaluation.num_targets(together)
    assert n == evaluation.num_targets(apart)

    loss_together = evaluation.caption_loss(model, together, n)
    loss_together.backward()
    g_together = grads(model)
    loss_apart = evaluation.caption_loss(model, apart, n)
    loss_apart.backward()
    g_apart = grads(model)
    assert encoded == [3, 6]  # one pass per image, against one per pair
    torch.testing.assert_close(loss_together, loss_apart, atol=1e-6, rtol=1e-6)
    assert_same_grads(g_together, g_apart)

    # Token-normalised accumulation still holds: images 0-1 and image 2 as two micro-batches,
    # each divided by the whole step's target tokens, give the one big batch's gradients.
    for micro in (all_batch(processor, REFS[:2]), all_batch(processor, REFS[2:], first=2)):
        evaluation.caption_loss(model, micro, n).backward()
    assert_same_grads(grads(model), g_together)


def test_an_epoch_of_all_captions_trains_every_caption_once(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    refs = [synthetic.retellings(synthetic.scene(0, i)[1], 1 + i % 4) for i in range(10)]  # 1 to 4 each
    ds = batches.build_dataset(images(10), refs, processor, max_text_length=40, all_captions=True)
    loader = batches.make_loader(ds, 3, batches.EpochSampler(len(ds), seed=1), processor.tokenizer.pad_token_id)
    seen = []
    for batch in batches.epoch_batches(loader, epoch=0, seed=1):
        b = len(batch["index"])
        for row, ids in enumerate(batch["input_ids"]):
            if (batch["labels"][row] != -100).any():
                image = int(batch["index"][row % b])
                seen.append((image, processor.tokenizer.decode(ids, skip_special_tokens=True)))
    tokenizer = processor.tokenizer
    as_trained = lambda c: tokenizer.decode(tokenizer(c)["input_ids"], skip_special_tokens=True)  # noqa: E731
    assert sorted(seen) == sorted((i, as_trained(c)) for i, caps in enumerate(refs) for c in caps)


@pytest.fixture(scope="module")
def five_captions(tmp_path_factory):
    """48 scenes with five captions each, as an imagefolder."""
    out = str(tmp_path_factory.mktemp("five-captions"))
    sources.write_imagefolder(synthetic.dataset(48, seed=3, captions_per_image=5), out)
    return out


def run_train(out, dataset, model, *extra):
    return train.main(["--dataset", dataset, "--model", model, "--output-dir", str(out), "--batch-size", "4",
                       "--grad-accum", "2", "--learning-rate", "1e-3", "--precision", "fp32", "--max-steps", "4",
                       "--logging-steps", "2", "--eval-steps", "4", "--save-steps", "4", "--num-examples", "1",
                       *extra])


def test_caption_sampling_all_through_train_py(tmp_path, five_captions, tiny_model_dir, capsys):
    run_train(tmp_path, five_captions, tiny_model_dir, "--caption-sampling", "all")
    out = capsys.readouterr().out
    assert "train 43 images with 215 captions (all per image an epoch)" in out
    state = torch.load(tmp_path / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert state["samples_done"] == 32  # the position in the data is still counted in images
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    captions = [e.value for e in events.Scalars("train/captions_per_second")]
    pictures = [e.value for e in events.Scalars("train/images_per_second")]
    assert len(captions) == 2 and captions == pytest.approx([5 * p for p in pictures], rel=1e-6)
    speed = [line for line in out.splitlines() if line.startswith("training speed:")][0]
    per_caption, per_image = (float(speed.split(" captions/s")[0].split()[-1]),
                              float(speed.split(" images/s")[0].split()[-1]))
    assert per_caption == pytest.approx(5 * per_image, rel=0.02) and "s per optimizer step" in speed


def test_freeze_vision_keeps_the_image_encoder_bit_identical(tmp_path, tiny_model_dir, monkeypatch, capsys):
    seen = []  # (training?, does the encoder's output carry a graph?) for each image-encoder pass
    real_load = gitmodel.load_model

    def load_and_watch(*args, **kwargs):
        git, processor = real_load(*args, **kwargs)
        git.git.image_encoder.register_forward_hook(
            lambda m, inputs, out: seen.append((m.training, out.last_hidden_state.requires_grad)))
        return git, processor

    monkeypatch.setattr(gitmodel, "load_model", load_and_watch)
    run_train(tmp_path, "synthetic", tiny_model_dir, "--synthetic-size", "60", "--freeze-vision")
    assert {grad for training, grad in seen if training} == {False}  # no autograd graph in the encoder

    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    vision = [k for k in start if k.startswith("git.image_encoder.")]
    assert vision and len(vision) < len(start)
    for folder in ("checkpoint-4", "best"):
        after = load_file(str(tmp_path / folder / "model.safetensors"))
        assert all(torch.equal(start[k], after[k]) for k in vision), folder
        for part in ("git.visual_projection.", "git.encoder.", "git.embeddings."):
            assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith(part)), (folder, part)
    # AdamW is handed the trained tensors only (it would make no state for a tensor without a gradient
    # either, so the state alone would not tell), and holds state for them.
    state = torch.load(tmp_path / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert sum(len(group["params"]) for group in state["optimizer"]["param_groups"]) == len(start) - len(vision)
    assert len(state["optimizer"]["state"]) == len(start) - len(vision)
    assert "M trained" in capsys.readouterr().out

    # Resuming without the flag would train the encoder from the middle of the run: refused.
    monkeypatch.setattr(gitmodel, "load_model", real_load)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "synthetic", tiny_model_dir, "--synthetic-size", "60", "--max-steps", "6", "--resume")
    assert e.value.code == 2 and "--freeze-vision False (was True)" in capsys.readouterr().err


def test_gradient_checkpointing_recomputes_and_gives_the_same_loss_and_gradients(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch = pairs_batch(processor, REFS)
    n = evaluation.num_targets(batch)
    results = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()  # dropout on
        set_up_for_training(model, gradient_checkpointing=checkpointing)
        calls = count_layer_passes(model)
        torch.manual_seed(7)
        loss = evaluation.caption_loss(model, batch, n)
        loss.backward()
        results.append((loss.detach(), grads(model), dict(calls)))
    (loss_plain, g_plain, calls_plain), (loss_ckpt, g_ckpt, calls_ckpt) = results
    # Every layer of both towers ran again in backward.
    assert calls_plain == {"text": 1, "vision": 1} and calls_ckpt == {"text": 2, "vision": 2}
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=1e-6)  # the same dropout masks
    assert_same_grads(g_ckpt, g_plain, atol=1e-5)


def count_layer_passes(model):
    """{"text": n, "vision": n}: how often the attention of each tower's first layer runs in training
    mode (a checkpointed layer runs in forward, then its insides again in backward; the layer's own
    hook sees only the first)."""
    calls = {"text": 0, "vision": 0}
    for tower, layer in (("text", model.git.encoder.layer[0].attention),
                         ("vision", model.git.image_encoder.vision_model.encoder.layers[0].self_attn)):
        layer.register_forward_hook(lambda m, *a, tower=tower: calls.__setitem__(tower, calls[tower] + m.training))
    return calls


def test_gradient_checkpointing_through_train_py_recomputes_and_logs_the_same_losses(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    logs, passes, real_load = [], [], gitmodel.load_model

    def load_and_watch(*args, **kwargs):
        git, processor = real_load(*args, **kwargs)
        passes.append(count_layer_passes(git))
        return git, processor

    monkeypatch.setattr(gitmodel, "load_model", load_and_watch)
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        run_train(tmp_path / name, "synthetic", tiny_model_dir, "--synthetic-size", "60", "--logging-steps", "1",
                  *extra)
        state = torch.load(tmp_path / name / "checkpoint-4" / "training_state.pt", weights_only=True)
        logs.append(state["train_log"])
        with open(tmp_path / name / "training_args.json") as f:
            assert json.load(f)["gradient_checkpointing"] == bool(extra)
    assert [s for s, _ in logs[0]] == [s for s, _ in logs[1]] == [1, 2, 3, 4]
    # 4 steps of 2 micro-batches: each layer of both towers ran once in each, and with the flag again in backward.
    assert passes == [{"text": 8, "vision": 8}, {"text": 16, "vision": 16}]
    torch.testing.assert_close([v for _, v in logs[1]], [v for _, v in logs[0]], atol=1e-5, rtol=0)
