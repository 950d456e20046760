"""Self-critical sequence training (Rennie et al. 2017), the pieces of one step: sample K captions
per image, reward each by its CIDEr-D against the image's references (document frequencies of the
training split, computed once), subtract a baseline, and weigh each sampled token's
log-probability by its caption's advantage.

- sample: K captions an image from `generate` (multinomial sampling), the image encoder running
  once per image, not K times (generate repeats every image K times in a row; the encoder is given
  one copy of each and its output is repeated);
- baselines: the mean reward of the image's other K - 1 samples (Luo 2020, "a better variant of
  self-critical sequence training": no extra decode), or a greedy caption's reward (Rennie's);
- sampled_batch: the samples as a training batch in collate's layout (row j * B + i holds sample j
  of image i, so caption_loss runs the encoder once an image too), each caption's targets up to and
  including its end token, none after it;
- the loss is evaluation.caption_loss with the advantages as row weights: minus advantage times the
  log-probability of each sampled token, over the sampled tokens of the accumulated batch.
"""
import contextlib

import torch

from captioning.strings import normalize


@contextlib.contextmanager
def one_image_pass(model, copies):
    """Within the block, GIT's image encoder, given each image `copies` times in a row, encodes
    one copy of each and repeats the result: what generate's num_return_sequences needs, at 1/copies
    of the cost."""
    encoder = model.git.image_encoder
    forward = encoder.forward

    def shared(pixel_values, *args, **kwargs):
        out = forward(pixel_values[::copies], *args, **kwargs)
        out.last_hidden_state = out.last_hidden_state.repeat_interleave(copies, dim=0)
        return out

    encoder.forward = shared
    try:
        yield
    finally:
        del encoder.forward  # the class's own again


def sample(model, pixel_values, k, max_length):
    """(B * K, L) token ids: K captions sampled for each of the B images, image i's in rows
    i * K .. i * K + K - 1, each starting with GIT's start token."""
    with torch.no_grad(), one_image_pass(model, k):
        return model.generate(pixel_values=pixel_values, do_sample=True, num_return_sequences=k, top_k=0,
                              top_p=1.0, max_length=max_length)


def rewards(tokenizer, ids, references, scorer, k):
    """(B, K) CIDEr-D of each sample against its image's references (lists of normalised strings)."""
    captions = [normalize(c) for c in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return torch.tensor([[scorer.score(captions[i * k + j], references[i]) for j in range(k)]
                         for i in range(len(references))], dtype=torch.float32)


def baselines(rewards, kind="mean", greedy=None):
    """(B, K) baseline for each sample: the mean reward of its image's other samples, or the
    image's greedy caption reward (greedy: (B,))."""
    if kind == "greedy":
        return greedy[:, None].expand_as(rewards)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the mean baseline needs at least 2 samples an image (--scst-samples)")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def sampled_batch(ids, pixel_values, k, eos_id, pad_id):
    """The samples as collate lays out a batch of several captions an image: row j * B + i holds
    sample j of image i; input ids and labels up to and including the first end token, padding
    (label -100) after it."""
    b, length = len(pixel_values), ids.shape[1]
    ids = ids.view(b, k, length).transpose(0, 1).reshape(b * k, length)  # i * K + j -> j * B + i
    is_end = ids == eos_id
    is_end[:, 0] = False  # the start token is never the end
    ended_before = (is_end.cumsum(dim=1) - is_end.long()) > 0  # positions after the first end token
    keep = ~ended_before & (ids != pad_id)
    keep[:, 0] = True
    input_ids = ids.masked_fill(~keep, pad_id)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": keep.long(),
            "labels": input_ids.masked_fill(~keep, -100)}


def image_major_to_rows(values, b, k):
    """(B, K) per-sample values -> (K * B,) in sampled_batch's row order."""
    return values.view(b, k).transpose(0, 1).reshape(-1)
