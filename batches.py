"""Rows of images and captions -> tensors and batches for GIT.

Images are decoded, resized and cropped once into uint8 pixels at the model's resolution (cached
on disk and memory-mapped by prepare_split), captions tokenised once; collate pads and normalises
each batch; the samplers shuffle per epoch, shard across torchrun ranks and start mid-epoch for
resume.
"""
import functools
import itertools
import json
import os
import shutil

import numpy as np
import torch

from data import DataError, check_columns, good_rows


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


CACHE_VERSION = 1  # bump when what prepare_split stores changes


def cache_key(table, image_column, text_column, image_processor):
    """Names the preprocessed form of a split: the table's datasets fingerprint (content, files and
    their modification times, split arguments) and everything that shapes the pixels."""
    import hashlib

    settings = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
    ident = json.dumps([CACHE_VERSION, table._fingerprint, image_column, text_column, settings], sort_keys=True,
                       default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def prepare_split(table, image_column, text_column, what, image_processor, skipped=None, cache_dir=None, chunk=64):
    """Decode, resize and crop every image once -> (uint8 pixels (N, 3, H, W), captions).

    Images are decoded a chunk at a time, so a split of full-size photos never sits in memory
    decoded. Bad rows raise or are described in `skipped`, as in read_rows. With cache_dir the
    result is written there (pixels as a raw file, opened memory-mapped: a split larger than memory
    is fine) and the next run with the same data and processor starts from it without decoding."""
    check_columns(table, image_column, text_column, what)
    folder = os.path.join(cache_dir, f"{what}-{cache_key(table, image_column, text_column, image_processor)}") \
        if cache_dir else None

    def from_cache():
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        if index["skipped"] and skipped is None:
            raise DataError(index["skipped"][0])
        if skipped is not None:
            skipped.extend(index["skipped"])
        shape = tuple(index["shape"])
        pixels = np.memmap(os.path.join(folder, "pixels.u8"), dtype=np.uint8, mode="r", shape=shape) \
            if shape[0] else np.zeros(shape, dtype=np.uint8)
        return pixels, index["captions"]

    if folder and os.path.isfile(os.path.join(folder, "index.json")):
        return from_cache()

    tmp = f"{folder}.tmp-{os.getpid()}" if folder else None
    if tmp:
        os.makedirs(tmp, exist_ok=True)
    chunks, captions, pending, bad = [], [], [], []
    out = open(os.path.join(tmp, "pixels.u8"), "wb") if tmp else None
    shape = None
    try:
        def flush():
            nonlocal shape
            if pending:
                block = to_pixels(image_processor, pending)
                shape = block.shape[1:]
                out.write(block.tobytes()) if out else chunks.append(block)
                pending.clear()

        for image, refs in good_rows(table, image_column, text_column, what, None if skipped is None else bad):
            pending.append(image)
            captions.append(refs)
            if len(pending) == chunk:
                flush()
        flush()
        full_shape = (len(captions), *(shape or (3, 1, 1)))
        if out:
            out.close()
            with open(os.path.join(tmp, "index.json"), "w") as f:
                json.dump({"shape": full_shape, "captions": captions, "skipped": bad}, f)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)  # complete, or not there at all
    except BaseException:
        if out:
            out.close()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder:
        return from_cache()
    if skipped is not None:
        skipped.extend(bad)
    return (np.concatenate(chunks) if chunks else np.zeros(full_shape, dtype=np.uint8)), captions


class CaptionDataset(torch.utils.data.Dataset):
    """Images (uint8, model resolution, possibly memory-mapped from the cache) with tokenised
    captions. With several captions per image, training draws one per epoch, seeded by
    (seed, epoch, index) so a resumed run draws the same ones."""

    def __init__(self, pixels, token_ids, references, seed=0, normalise=None):
        self.pixels, self.token_ids, self.references, self.seed = pixels, token_ids, references, seed
        self.mean, self.std = normalise if normalise else (torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
        self.epoch = None  # None: always the first caption (evaluation)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.token_ids)

    def __getitem__(self, i):
        choices = self.token_ids[i]
        k = 0
        if self.epoch is not None and len(choices) > 1:
            k = int(np.random.default_rng([self.seed, self.epoch, i]).integers(len(choices)))
        return torch.from_numpy(np.array(self.pixels[i])), choices[k], i


def tokenise(tokenizer, captions, max_text_length):
    """Each image's references -> a list of token id lists, truncated to max_text_length."""
    flat = [c for refs in captions for c in refs]
    ids = tokenizer(flat, truncation=True, max_length=max_text_length)["input_ids"] if flat else []
    token_ids, k = [], 0
    for refs in captions:
        token_ids.append(ids[k:k + len(refs)])
        k += len(refs)
    return token_ids


def build_dataset(images, captions, processor, max_text_length, seed=0):
    """From decoded images (PIL) or from uint8 pixels made by prepare_split."""
    pixels = images if isinstance(images, np.ndarray) else to_pixels(processor.image_processor, images)
    return CaptionDataset(pixels, tokenise(processor.tokenizer, captions, max_text_length), captions, seed,
                          normaliser(processor.image_processor))


def collate(batch, pad_id=0, mean=0.0, std=1.0):
    """Pad captions to the longest in the batch. Labels are the input ids with padding set to -100
    so the loss ignores it (the recipe trains on 512-token padding). uint8 pixels become floats
    scaled to [0, 1] and normalised, as the image processor would have."""
    pixels, ids, index = zip(*batch)
    length = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, :len(x)] = torch.tensor(x)
        attention_mask[row, :len(x)] = 1
    pixels = torch.stack(pixels)
    if pixels.dtype == torch.uint8:
        pixels = (pixels.float() / 255 - mean) / std
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100), "index": torch.tensor(index)}


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """torch's DistributedSampler (a seeded shuffle per epoch, this rank's share of it) that can
    also start part-way through its share, for resume. With num_replicas=1 it is a plain seeded
    shuffle, so one process and N ranks draw from the same permutation."""

    def __init__(self, n, seed=0, shuffle=True, num_replicas=1, rank=0):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation: rank r takes items r, r + N, r + 2N... in order, without the padding
    DistributedSampler adds, so every eval image is scored exactly once across ranks."""

    def __init__(self, n, num_replicas=1, rank=0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def make_loader(dataset, batch_size, sampler, pad_id, num_workers=0, pin_memory=False):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=functools.partial(collate, pad_id=pad_id, mean=getattr(dataset, "mean", 0.0),
                                     std=getattr(dataset, "std", 1.0)),
        generator=torch.Generator())


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
