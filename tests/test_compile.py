"""--compile: a few fixed batch shapes (caption lengths in buckets, the short last batch filled up)
so the compiled step is not compiled again for every new caption length; the same loss."""
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

import batches
import synthetic
import train


def items(processor, captions, first=0):
    """Dataset items (pixels, token lists, index) for images with the given lists of captions."""
    images = [synthetic.scene(3, first + i)[0] for i in range(len(captions))]
    ds = batches.build_dataset(images, captions, processor, max_text_length=40, all_captions=True)
    ds.set_epoch(0)  # training's items: every caption of an image
    return [ds[i] for i in range(len(ds))]


def test_buckets_fix_the_length_and_a_short_batch_is_filled_with_blank_images(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert [batches.bucket_length(n, 64) for n in (1, 16, 17, 25, 33, 49, 64)] == [16, 16, 24, 32, 48, 64, 64]
    assert batches.bucket_length(33, 40) == 40  # --max-text-length is the last bucket
    short = items(processor, [["a red circle"], ["a small blue square at the top and a large red circle"]])
    plain = batches.collate(short, 0)
    fixed = batches.collate(short, 0, static=(4, 40))
    assert plain["input_ids"].shape[0] == 2 and plain["input_ids"].shape[1] < 16
    assert fixed["pixel_values"].shape[0] == 4 and fixed["input_ids"].shape == (4, 16)
    assert fixed["index"].tolist() == [0, 1]  # filler images are not samples
    assert (fixed["labels"][2:] == -100).all() and (fixed["attention_mask"][2:] == 0).all()
    assert torch.equal(fixed["labels"][:2, :plain["labels"].shape[1]], plain["labels"])
    assert train.num_targets(fixed) == train.num_targets(plain) and train.num_captions(fixed) == 2
    # Several captions an image: rows j * B + i with B the filled-up image count.
    two = items(processor, [["a red circle", "a circle"], ["a blue square"]])
    fixed = batches.collate(two, 0, static=(3, 40))
    assert fixed["input_ids"].shape == (6, 16) and train.num_captions(fixed) == 3
    assert fixed["attention_mask"][[0, 1, 3]].any(dim=1).all() and not fixed["attention_mask"][[2, 4, 5]].any()


def test_static_loss_equals_the_loss_over_targets_only(no_dropout_model):
    model = AutoModelForCausalLM.from_pretrained(no_dropout_model).eval()
    processor = AutoProcessor.from_pretrained(no_dropout_model)
    batch = batches.collate(items(processor, [["a red circle"], ["a large green triangle on the left"],
                                              ["a small square"]]), 0, static=(4, 40))
    n = train.num_targets(batch)
    losses, grads = [], []
    for static in (False, True):
        loss = train.caption_loss(model, batch, n, static=static)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_compiled_run_meets_one_shape_per_bucket_and_reports_its_compile_time(tmp_path, capsys):
    # 100 scenes, batch 16: 6 batches an epoch, the last of 10 images (filled up to 16), captions
    # of 5 to 20 tokens: lengths bucket to 16 or 24. Two epochs, so every shape comes round again.
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    best = train.main(["--dataset", "synthetic", "--synthetic-size", "110", "--model", "tiny", "--batch-size", "16",
                       "--grad-accum", "1", "--max-steps", "12", "--eval-steps", "12", "--save-steps", "12",
                       "--logging-steps", "6", "--precision", "auto", "--compile", "--num-examples", "0",
                       "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert best["value"] < 1.5
    speed = re.search(r"training speed: .* \(evaluation and saving, and ([\d.]+) s of compiling, excluded\)", out)
    assert speed and float(speed.group(1)) > 0, out
    # Frames compiled: the model's forward pieces, once per batch shape (16 or 24 tokens); without
    # the buckets and the filled-up last batch there would be one per caption length and batch size.
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    recompiles = sum(n for k, n in torch._dynamo.utils.counters["recompiles"].items())
    assert frames > 0
    assert recompiles <= 2, dict(torch._dynamo.utils.counters["recompiles"])
