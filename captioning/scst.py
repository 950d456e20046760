"""Self-critical sequence training (Rennie et al. 2017): train.py --objective scst. Each image's
training captions are replaced by K captions the model samples itself; each is rewarded by its
CIDEr-D against the image's references (document frequencies of the training split, computed
once), a baseline is subtracted, and each sampled token's log-probability is weighed by its
caption's advantage.

- sample: K captions an image, drawn with noise from the image's own random stream (seeded by the
  run's seed, the epoch and the image), so that a draw does not depend on which images share the
  batch or the rank, nor on any saved RNG state: a resumed run and N ranks draw what one process
  drew. The image encoder runs once per image, not K times (its output is repeated K times);
- baselines: the mean reward of the image's other K - 1 samples (Luo 2020, "a better variant of
  self-critical sequence training": no extra decode), or a greedy caption's reward (Rennie's);
- sampled_batch: the samples as a training batch in collate's layout (row j * B + i holds sample j
  of image i, so caption_loss runs the encoder once an image too), each caption's targets up to and
  including its end token, none after it;
- the loss is evaluation.caption_loss with the advantages as row weights: minus advantage times the
  log-probability of each sampled token, over the sampled tokens of the accumulated batch;
- SelfCritic puts these together for one micro-batch, with the numbers train.py logs.
"""
import contextlib

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from captioning import batches, evaluation, runtime
from captioning.measures import CiderD
from captioning.strings import normalize

# What SelfCritic.sampled adds up for a logging window: sums over the samples (reward, baseline,
# length: tokens through the end token) and over the images (spread: the standard deviation of an
# image's advantages; distinct: its distinct samples over K), and the counts to divide them by.
STATS = ("reward", "baseline", "length", "samples", "spread", "distinct", "images")


@contextlib.contextmanager
def one_image_pass(model, copies):
    """Within the block, GIT's image encoder, given each image `copies` times in a row, encodes
    one copy of each and repeats the result: K samples an image at 1/K of the encoder's cost."""
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


def image_generators(seed, epoch, indices, device):
    """One random stream per image, a function of (seed, epoch, the image's index) alone."""
    generators = []
    for index in indices:
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]))
        generators.append(g)
    return generators


class GumbelNoise(LogitsProcessor):
    """Adds Gumbel noise to each row's next-token scores: the argmax of the result is a draw from
    the softmax of the scores (the Gumbel-max trick), so greedy decoding with it is multinomial
    sampling at temperature 1 with no top-k or top-p. Rows are image-major (image i's K samples in
    rows i * K ...), each image's noise drawn from its own generator."""

    def __init__(self, generators, k):
        self.generators, self.k = generators, k

    def __call__(self, input_ids, scores):
        noise = torch.cat([torch.empty((self.k, scores.shape[1]), device=scores.device).exponential_(generator=g)
                           for g in self.generators])
        return scores.float() - noise.log()  # -log(Exp(1)) is Gumbel(0, 1)


def sample(model, pixel_values, k, max_length, generators):
    """(B * K, L) token ids: K captions sampled for each of the B images, image i's in rows
    i * K .. i * K + K - 1, each starting with GIT's start token; generators: one per image."""
    with torch.no_grad(), one_image_pass(model, k):
        return model.generate(pixel_values=pixel_values.repeat_interleave(k, dim=0), do_sample=False, num_beams=1,
                              max_length=max_length, logits_processor=LogitsProcessorList([GumbelNoise(generators, k)]))


def rewards(tokenizer, ids, references, scorer, k):
    """(B, K) CIDEr-D of each sample against its image's references (lists of normalised strings),
    and the samples' normalised text, image-major."""
    captions = [normalize(c) for c in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return torch.tensor([[scorer.score(captions[i * k + j], references[i]) for j in range(k)]
                         for i in range(len(references))], dtype=torch.float32), captions


def baselines(rewards, kind="mean", greedy=None):
    """(B, K) baseline for each sample: the mean reward of its image's other samples, or the
    image's greedy caption reward (greedy: (B,))."""
    if kind == "greedy":
        return greedy[:, None].expand_as(rewards)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the mean baseline needs at least 2 samples an image (--scst-samples)")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def sampled_batch(ids, pixel_values, k, eos_id, pad_id, length=None):
    """The samples as collate lays out a batch of several captions an image: row j * B + i holds
    sample j of image i; input ids and labels up to and including the first end token, padding
    (label -100) after it, and up to `length` columns if given (--compile's fixed shapes)."""
    b, sampled = len(pixel_values), ids.shape[1]
    ids = ids.view(b, k, sampled).transpose(0, 1).reshape(b * k, sampled)  # i * K + j -> j * B + i
    if length is not None and length > sampled:
        ids = torch.cat([ids, ids.new_full((b * k, length - sampled), pad_id)], dim=1)
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
    return values.reshape(b, k).transpose(0, 1).reshape(-1)


class SelfCritic:
    """SCST's half of a training step: a micro-batch of training images -> their K samples as a
    batch whose rows are weighed by their advantages, and the STATS train.py logs.

    Sampling runs in eval mode (no dropout: the captions the model would write), the loss pass in
    train mode, as cross-entropy's does. references: each training image's reference captions."""

    def __init__(self, references, tokenizer, eos_id, args):
        self.references = [[r for r in map(normalize, refs) if r] for refs in references]
        for index, refs in enumerate(self.references):
            if not refs:
                raise ValueError(f"training image {index} has no reference caption with a word in it "
                                 f"({references[index]!r}): SCST has nothing to reward its samples against")
        self.scorer = CiderD(self.references)  # document frequencies of the training split, once
        self.tokenizer, self.eos_id, self.pad_id = tokenizer, eos_id, tokenizer.pad_token_id
        self.k, self.kind, self.seed = args.scst_samples, args.scst_baseline, args.seed
        self.max_length = args.scst_max_length or args.gen_max_length
        self.static = args.compile

    def sampled(self, model, batch, epoch, device, amp_dtype):
        pixels = evaluation.to_device({"pixel_values": batch["pixel_values"]}, device)["pixel_values"]
        index = batch["index"].tolist()
        b, k = len(index), self.k
        training = model.training
        model.eval()
        try:
            with runtime.autocast(device, amp_dtype):
                ids = sample(model, pixels, k, self.max_length, image_generators(self.seed, epoch, index, device))
                if self.kind == "greedy":
                    with torch.no_grad():
                        greedy_ids = model.generate(pixel_values=pixels, max_length=self.max_length, num_beams=1,
                                                    do_sample=False)
        finally:
            model.train(training)
        references = [self.references[i] for i in index]
        reward, captions = rewards(self.tokenizer, ids.cpu(), references, self.scorer, k)
        greedy = rewards(self.tokenizer, greedy_ids.cpu(), references, self.scorer, 1)[0][:, 0] \
            if self.kind == "greedy" else None
        baseline = baselines(reward, self.kind, greedy)
        advantage = reward - baseline
        length = batches.bucket_length(ids.shape[1], self.max_length) if self.static else None
        out = sampled_batch(ids, pixels, k, self.eos_id, self.pad_id, length)
        out["row_weights"] = image_major_to_rows(advantage, b, k).to(device)
        out["index"] = batch["index"]
        distinct = sum(len(set(captions[i * k:(i + 1) * k])) / k for i in range(b))
        stats = (float(reward.sum()), float(baseline.sum()), evaluation.num_targets(out), b * k,
                 float(advantage.std(dim=1, correction=0).sum()), distinct, b)
        return out, stats


def window_means(sums):
    """A logging window's STATS sums -> {name: mean}: reward, baseline and sample length per sample,
    the advantages' spread and the share of distinct samples per image."""
    s = dict(zip(STATS, sums))
    return {"reward": s["reward"] / s["samples"], "baseline": s["baseline"] / s["samples"],
            "advantage_spread": s["spread"] / s["images"], "sample_length": s["length"] / s["samples"],
            "distinct_samples": s["distinct"] / s["images"]}
