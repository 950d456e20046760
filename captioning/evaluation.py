"""The loss and the evaluation, as training and metrics.py --model both compute them.

caption_loss is next-token cross-entropy over caption tokens only (GIT's image-token count is in
gitmodel.py); evaluate adds the captions model.generate writes for the eval split.
"""
import torch
import torch.nn.functional as F

from captioning import batches, distributed, runtime
from captioning.gitmodel import num_image_tokens



def caption_loss(model, batch, num_tokens, static=False, label_smoothing=0.0, row_weights=None):
    """Summed next-token cross-entropy over caption tokens, divided by num_tokens.

    GIT prepends the image tokens to the caption, and its own forward projects every position
    (image tokens included) onto the vocabulary. We ask for logits only where a target exists: the
    caption position j predicts token j + 1, for every j whose target is not padding.
    static (--compile): logits at every caption position instead, padding included, so that no
    shape depends on how many targets a batch holds (each new shape would be a new compile).
    label_smoothing (--label-smoothing, training only): each target's cross-entropy against the
    target smoothed by that share over the vocabulary, as F.cross_entropy computes it.
    row_weights: one weight per row, times each of its targets' cross-entropy (SCST's advantages).
    """
    targets = batch["labels"][:, 1:]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], use_cache=False)
    weights = None if row_weights is None else row_weights[:, None].expand_as(targets)
    if static:
        logits = model(**inputs, logits_to_keep=targets.shape[1] + 1).logits[:, :-1]
        logits, targets = logits.flatten(0, 1), targets.flatten()
        weights = None if weights is None else weights.flatten()
    else:
        has_target = targets != -100
        n_img = num_image_tokens(unwrap(model).config)
        keep = has_target.new_zeros((targets.shape[0], n_img + targets.shape[1] + 1))
        keep[:, n_img:-1] = has_target
        logits = model(**inputs, logits_to_keep=keep).logits
        targets, weights = targets[has_target], None if weights is None else weights[has_target]
    if weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing) / num_tokens
    losses = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)
    return (losses * weights).sum() / num_tokens


def unwrap(model):
    """The GIT model inside DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def num_targets(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def num_captions(batch):
    """Caption rows with something to predict (--caption-sampling all adds filler rows without)."""
    return int((batch["labels"][:, 1:] != -100).any(dim=1).sum())


def to_device(batch, device):
    # Images channels-last, like the model's patch convolution (see load_data_and_model).
    return {k: v.to(device, non_blocking=True, memory_format=torch.channels_last) if v.ndim == 4
            else v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model, processor, loader, device, amp_dtype, gen_max_length, world=1, num_beams=1):
    """Teacher-forced loss over the eval split (first reference) and the captions generate() writes.
    Under torchrun each rank scores its shard and the results are gathered on every rank."""
    model.eval()
    loss_sum, tokens, predictions, order = 0.0, 0, [], []
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            n = num_targets(batch)
            with runtime.autocast(device, amp_dtype):
                loss_sum += caption_loss(model, batch, 1).item()
                generated = model.generate(pixel_values=batch["pixel_values"], max_length=gen_max_length,
                                           num_beams=num_beams)
            tokens += n
            predictions += processor.batch_decode(generated, skip_special_tokens=True)
            order += batch["index"].tolist()
    model.train()
    shards = distributed.gather((loss_sum, tokens, list(zip(order, predictions))), world)
    by_index = dict(pair for _, _, pairs in shards for pair in pairs)
    loss = sum(s[0] for s in shards) / max(sum(s[1] for s in shards), 1)
    return loss, [by_index[i] for i in range(len(by_index))]


def make_eval_loader(args, pixels, captions, processor, device, rank=0, world=1):
    """The evaluation loader, here and in metrics.py --model: each image once across ranks, in order, with
    its first reference as the loss target, batched by --eval-batch-size."""
    eval_set = batches.build_dataset(pixels, captions, processor, args.max_text_length, args.seed)
    return batches.make_loader(eval_set, args.eval_batch_size, batches.ShardSampler(len(eval_set), world, rank),
                               processor.tokenizer.pad_token_id, args.num_workers, device.type == "cuda")
