"""--compile: a few fixed batch shapes (caption lengths in buckets, the short last batch filled up)
so the compiled step is not compiled again for every new caption length; the same loss."""
import functools
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from captioning import batches, evaluation, flags, sources, synthetic
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
    assert evaluation.num_targets(fixed) == evaluation.num_targets(plain) and evaluation.num_captions(fixed) == 2
    # Several captions an image: rows j * B + i with B the filled-up image count.
    two = items(processor, [["a red circle", "a circle"], ["a blue square"]])
    fixed = batches.collate(two, 0, static=(3, 40))
    assert fixed["input_ids"].shape == (6, 16) and evaluation.num_captions(fixed) == 3
    assert fixed["attention_mask"][[0, 1, 3]].any(dim=1).all() and not fixed["attention_mask"][[2, 4, 5]].any()


def test_static_loss_equals_the_loss_over_targets_only(no_dropout_model):
    model = AutoModelForCausalLM.from_pretrained(no_dropout_model).eval()
    processor = AutoProcessor.from_pretrained(no_dropout_model)
    batch = batches.collate(items(processor, [["a red circle"], ["a large green triangle on the left"],
                                              ["a small square"]]), 0, static=(4, 40))
    n = evaluation.num_targets(batch)
    losses, grads = [], []
    for static in (False, True):
        loss = evaluation.caption_loss(model, batch, n, static=static)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


# 50 scenes: 45 to train on, batch 4: 12 batches an epoch, the last of 1 image (filled up to 4);
# 14 steps cross the epoch's end.
COMPILED_RUN = ["--dataset", "synthetic", "--synthetic-size", "50", "--batch-size", "4", "--grad-accum", "1",
                "--max-steps", "14", "--eval-steps", "14", "--save-steps", "14", "--logging-steps", "7",
                "--learning-rate", "1e-3", "--precision", "auto", "--compile", "--num-examples", "0"]


def bucket_shapes(model_dir):
    """The batch shapes --compile can meet on COMPILED_RUN's data: one batch size, and the length
    buckets its captions fall in (a batch is padded to the bucket of its longest caption)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    captions = sources.load_tables(flags.parse_args([*COMPILED_RUN, "--model", model_dir]))[0]["text"]
    refs = [[c] if isinstance(c, str) else c for c in captions]
    lengths = [len(ids) for caps in batches.tokenise(processor.tokenizer, refs, 64) for ids in caps]
    return {batches.bucket_length(n, 64) for n in lengths}


def graphs_compiled(model_dir, out, monkeypatch, backend=None, bucketed=True):
    """(train.main's result, the graphs torch.compile made) for COMPILED_RUN. backend: another
    torch.compile backend than inductor; bucketed=False: batches as without --compile."""
    import torch._dynamo

    if backend:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    if not bucketed:
        make_loader = batches.make_loader
        monkeypatch.setattr(batches, "make_loader", lambda *a, static_length=None, **k: make_loader(*a, **k))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    best = train.main([*COMPILED_RUN, "--model", model_dir, "--output-dir", str(out)])
    return best, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_run_makes_a_graph_per_bucket_at_most_and_reports_its_compile_time(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    shapes = bucket_shapes(tiny_model_dir)
    best, graphs = graphs_compiled(tiny_model_dir, tmp_path / "run", monkeypatch)
    out = capsys.readouterr().out
    assert best["value"] < 1.5
    speed = re.search(r"training speed: .* \(evaluation and saving, and ([\d.]+) s of compiling, excluded\)", out)
    assert speed and float(speed.group(1)) > 0, out
    # Without the buckets and the filled-up last batch there would be a graph per caption length and batch size.
    assert 0 < graphs <= len(shapes), (graphs, shapes)


def test_without_the_buckets_the_same_check_fails(tiny_model_dir, tmp_path, monkeypatch):
    """The negative control of the test above (with dynamo's eager backend: dynamo makes the same
    graphs, without inductor's minutes of code generation)."""
    shapes = bucket_shapes(tiny_model_dir)
    _, plain = graphs_compiled(tiny_model_dir, tmp_path / "plain", monkeypatch, backend="eager", bucketed=False)
    assert len(shapes) < plain, (plain, shapes)
