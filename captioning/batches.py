"""Pixels and captions -> tensors and batches for GIT.

The pixels come from cache.py (decoded, resized and cropped once); captions are tokenised once here;
collate pads and normalises each batch; the samplers shuffle per epoch, shard across torchrun ranks
and start mid-epoch for resume.
"""
import functools

import numpy as np
import torch

from captioning import workers


def pixel_values(image_processor, images, chunk=64):
    """Run the checkpoint's image processor once over all images: (N, 3, H, W) float32."""
    out = [image_processor(images=images[i:i + chunk], return_tensors="pt")["pixel_values"]
           for i in range(0, len(images), chunk)]
    return torch.cat(out) if out else torch.empty(0)


def to_pixels(image_processor, images):
    """PIL images -> (N, 3, H, W) uint8, resized and cropped by the checkpoint's processor but not
    yet rescaled or normalised: a quarter of float32's size. collate() normalises each batch, which
    gives the processor's own output exactly."""
    if not images:
        return np.zeros((0, 3, 1, 1), dtype=np.uint8)
    out = image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    return out if out.dtype == np.uint8 else np.clip(np.rint(out), 0, 255).astype(np.uint8)


def normaliser(image_processor):
    """(mean, std) as (3, 1, 1) tensors for uint8 pixels scaled to [0, 1]."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
    return mean, std


# ---------------------------------------------------------------------------------------------
# Filling: rows -> pixels in slots, in this process or in worker processes


# ---------------------------------------------------------------------------------------------
# Cache entries: CACHE/{what}-{key}/ with pixels.u8 and index.json, built in {entry}.tmp-PID


class CaptionDataset(torch.utils.data.Dataset):
    """Images (uint8, model resolution, possibly memory-mapped from the cache) with tokenised
    captions; an item is (pixels, a list of token id lists, index). With several captions per image,
    training takes one drawn per epoch, seeded by (seed, epoch, index) so a resumed run draws the
    same ones, or with all_captions every one of them; evaluation always takes the first."""

    def __init__(self, pixels, token_ids, references, seed=0, normalise=None, all_captions=False):
        self.pixels, self.token_ids, self.references, self.seed = pixels, token_ids, references, seed
        self.mean, self.std = normalise if normalise else (torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
        self.all_captions = all_captions
        self.epoch = None  # None: always the first caption (evaluation)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.token_ids)

    def __getitem__(self, i):
        choices = self.token_ids[i]
        pixels = torch.from_numpy(np.array(self.pixels[i]))
        if self.epoch is None:
            return pixels, choices[:1], i
        if self.all_captions:
            return pixels, choices, i
        k = int(np.random.default_rng([self.seed, self.epoch, i]).integers(len(choices))) if len(choices) > 1 else 0
        return pixels, [choices[k]], i


def tokenise(tokenizer, captions, max_text_length):
    """Each image's references -> a list of token id lists, truncated to max_text_length."""
    flat = [c for refs in captions for c in refs]
    ids = tokenizer(flat, truncation=True, max_length=max_text_length)["input_ids"] if flat else []
    token_ids, k = [], 0
    for refs in captions:
        token_ids.append(ids[k:k + len(refs)])
        k += len(refs)
    return token_ids


def build_dataset(images, captions, processor, max_text_length, seed=0, all_captions=False):
    """From decoded images (PIL) or from uint8 pixels made by prepare_split."""
    pixels = images if isinstance(images, np.ndarray) else to_pixels(processor.image_processor, images)
    return CaptionDataset(pixels, tokenise(processor.tokenizer, captions, max_text_length), captions, seed,
                          normaliser(processor.image_processor), all_captions)


# --compile pads captions up to one of these lengths (or --max-text-length), so that the compiled
# step meets a handful of shapes in a run instead of one per caption length (each new shape is a
# new compile). Each is at most 1.5x the one below: little padding for the decoder to carry.
LENGTH_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_length(n, max_length):
    return min(b for b in (*LENGTH_BUCKETS, max_length) if b >= n)


def collate(batch, pad_id=0, mean=0.0, std=1.0, static=None):
    """B images and their captions -> one batch. Row j * B + i holds caption j of image i, because
    GIT's forward repeats the B projected images over the caption rows (row r gets image r % B):
    the image encoder runs once for all captions of an image. An image with fewer captions than
    the most in its batch gets filler rows: padding only, no targets, so they add nothing to the
    loss (they cost decoder compute like any row). Captions are padded to the longest in the batch;
    labels are the input ids with padding set to -100 so the loss ignores it (the recipe trains on
    512-token padding). uint8 pixels become floats scaled to [0, 1] and normalised, as the image
    processor would have.
    static=(images, max_length), for --compile: the batch always holds `images` images (the epoch's
    last, short batch gets blank filler images whose rows are all filler) and captions are padded to
    a LENGTH_BUCKETS length, so only the count of captions per image and the bucket change shape."""
    pixels, captions, index = zip(*batch)
    if static:
        filler = static[0] - len(pixels)
        pixels, captions = pixels + (torch.zeros_like(pixels[0]),) * filler, captions + ([],) * filler
    rows = [caps[j] if j < len(caps) else [] for j in range(max(map(len, captions))) for caps in captions]
    length = max(len(x) for x in rows)
    if static:
        length = bucket_length(length, static[1])
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, x in enumerate(rows):
        input_ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        attention_mask[row, :len(x)] = 1
    pixels = torch.stack(pixels)
    if pixels.dtype == torch.uint8:
        pixels = (pixels.float() / 255 - mean) / std
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100), "index": torch.tensor(index)}


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """torch's DistributedSampler (a seeded shuffle per epoch, padded to a multiple of the ranks,
    rank r taking every num_replicas-th sample from r) that can also start part-way through the
    epoch, for resume. `start` counts the samples all ranks took together: N ranks that took k
    each have taken exactly the first N * k of the permutation, so any number of ranks can take
    the rest. With num_replicas=1 it is a plain seeded shuffle: one process and N ranks draw from
    the same permutation."""

    def __init__(self, n, seed=0, shuffle=True, num_replicas=1, rank=0):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def epoch_order(self):
        """The whole epoch's samples, as DistributedSampler orders and pads them for all ranks."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        while len(order) < self.total_size:
            order += order[:self.total_size - len(order)]
        return order

    def __iter__(self):
        return iter(self.epoch_order()[self.start + self.rank::self.num_replicas])

    def __len__(self):
        return len(range(self.start + self.rank, self.total_size, self.num_replicas))


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation: rank r takes items r, r + N, r + 2N... in order, without the padding
    DistributedSampler adds, so every eval image is scored exactly once across ranks."""

    def __init__(self, n, num_replicas=1, rank=0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loader(dataset, batch_size, sampler, pad_id, num_workers=0, pin_memory=False, static_length=None):
    """static_length: --compile's fixed batch shapes (see collate), captions at most this long."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=functools.partial(collate, pad_id=pad_id, mean=getattr(dataset, "mean", 0.0),
                                     std=getattr(dataset, "std", 1.0),
                                     static=(batch_size, static_length) if static_length else None),
        worker_init_fn=workers.initializer() if num_workers else None, generator=torch.Generator())


def epoch_batches(loader, epoch, start=0, seed=0):
    """An iterator over the batches of `epoch`, from sample `start` of this rank's share on.

    Everything random in it is a function of (seed, epoch): the shuffle, the caption drawn for
    images with several, and the worker seeds. A DataLoader draws its worker seed from its
    generator at every new iterator, so without the reseed a resumed run (one fresh iterator
    instead of one per earlier epoch) would give its workers other seeds."""
    loader.sampler.set_epoch(epoch, start)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(seed * 100_003 + epoch)
    return iter(loader)
