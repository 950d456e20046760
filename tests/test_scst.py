"""SCST's pieces (captioning/scst.py) on hand-made batches: one image-encoder pass per image while
sampling K captions, the leave-one-out baseline, the sampled batch's targets up to the end token,
and the loss as minus advantage times each sampled token's log-probability."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from captioning import evaluation, scst, synthetic
from captioning.measures import CiderD


def model_and_pixels(model_dir, n=2):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    pixels = processor.image_processor([synthetic.scene(21, i)[0] for i in range(n)], return_tensors="pt")["pixel_values"]
    return model, processor, pixels


def test_k_samples_an_image_run_the_image_encoder_once_an_image_and_sample_the_same(no_dropout_model):
    model, _, pixels = model_and_pixels(no_dropout_model)
    encoded = []
    # the patch embedding: where the encoder's work on each image starts
    patches = model.git.image_encoder.vision_model.embeddings
    hook = patches.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    torch.manual_seed(3)
    ids = scst.sample(model, pixels, 4, max_length=12)
    assert encoded == [2] and ids.shape[0] == 8  # 2 images encoded once, 4 samples each
    encoded.clear()
    torch.manual_seed(3)  # generate's own way: each image encoded 4 times, the same features, the same draws
    with torch.no_grad():
        plain = model.generate(pixel_values=pixels, do_sample=True, num_return_sequences=4, top_k=0, max_length=12)
    hook.remove()
    assert encoded == [8] and torch.equal(ids, plain)
    assert len({tuple(row.tolist()) for row in ids}) > 1  # sampled, not greedy
    assert model.git.image_encoder.forward.__func__ is type(model.git.image_encoder).forward  # put back


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
    got = scst.rewards(tokenizer, ids, refs[:2], scorer, 2)
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
    torch.manual_seed(5)
    ids = scst.sample(model, pixels, 3, max_length=10)
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
