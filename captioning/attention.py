"""--attention sdpa: GIT's attention through torch's fused `F.scaled_dot_product_attention`.

transformers gives GIT's text decoder only an eager attention: it writes out the full
(image + caption)^2 score matrix of every head, adds the mask, softmaxes and applies dropout as
separate kernels. `use_sdpa` swaps, in a loaded model, each decoder self-attention for one that
holds the very same query/key/value layers (so the state dict, and every checkpoint saved from it,
is plain GIT) and computes the same attention in fused calls; and it points the CLIP vision tower,
which already knows SDPA, at it.

The decoder's sequence is [P image tokens | T caption tokens]. Image tokens attend to all image
tokens and to no caption token; caption token t attends to every image token and to caption
tokens up to t, minus padding. So the work splits in two calls:
- image queries against image keys, with no mask at all (images are never padded): the P x P
  block, most of the attention's FLOPs at git-base size (P = 197, T ~ 20);
- caption queries against all keys, with the model's own mask rows for them (causal + padding).
The P x T block of scores that eager computes and then masks away is never computed.

Which queries are image tokens is known only to GitModel's forward: it prepends the P image tokens
when it is given pixel values, and not otherwise (GIT also runs on text alone, and generate's later
passes hold only new caption tokens). A hook on it passes that count down to the layers, and every
query not known to be an image token goes through the model's own mask.

The fused kernels are chosen per call (`sdpa_kernel`), not left to torch: cuDNN's, which torch
prefers on recent GPUs, is left out (its backward has given NaN query gradients with a mask on
H100/H200 since torch 2.11, pytorch/pytorch#196678; the caption call has a mask).
The image call has no mask: FlashAttention (fp16/bf16 on CUDA, and torch's CPU kernel), else the
memory-efficient kernel. The caption call has an additive mask, which CUDA's FlashAttention cannot
take: the memory-efficient kernel first (it takes any mask), then FlashAttention (on the CPU it
takes one). The math kernel is the last resort of both.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from transformers.models.git.modeling_git import GitSelfAttention


ATTENTIONS = ("sdpa", "eager")
IMAGE_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CAPTION_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
IMAGE_QUERIES = "git_image_queries"  # the keyword GitModel's hook passes down to the layers


class SdpaSelfAttention(GitSelfAttention):
    """GitSelfAttention's parameters and inputs, computed by scaled_dot_product_attention. A subclass,
    so that what transformers finds by class (the attention maps of output_attentions) finds it."""

    def __init__(self, eager):
        nn.Module.__init__(self)  # not GitSelfAttention's: the layers are eager's own, not new ones
        # The same Linear modules under the same names: the state dict does not change.
        self.query, self.key, self.value = eager.query, eager.key, eager.value
        self.dropout = eager.dropout  # its p, applied to the attention probabilities as eager does
        self.layer_idx = eager.layer_idx
        self.num_attention_heads, self.all_head_size = eager.num_attention_heads, eager.all_head_size
        self.attention_head_size = eager.attention_head_size
        # GitModel reads this name to widen the padding mask over the cached image tokens.
        self.image_patch_tokens = eager.image_patch_tokens
        self._forward_hooks.update(eager._forward_hooks)  # e.g. those recording output_attentions
        self.train(eager.training)  # a model swapped after .eval() must not start applying dropout

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        images = kwargs.pop(IMAGE_QUERIES, 0)  # unknown: every query goes through the model's mask
        if kwargs.get("output_attentions"):
            # The probabilities are asked for, which the fused kernels never write out: eager's own computation.
            return super().forward(hidden_states, attention_mask, cache, **kwargs)
        batch, length, _ = hidden_states.shape
        heads = (batch, length, -1, self.attention_head_size)
        query = self.query(hidden_states).view(heads).transpose(1, 2)
        key = self.key(hidden_states).view(heads).transpose(1, 2)
        value = self.value(hidden_states).view(heads).transpose(1, 2)
        if cache is not None:  # generate: the image keys/values sit in the cache from the first pass on
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        dropout = self.dropout.p if self.training else 0.0
        parts = []
        if images:  # the first `images` queries and keys are the image tokens
            with sdpa_kernel(IMAGE_KERNELS, set_priority=True):
                parts.append(F.scaled_dot_product_attention(
                    query[:, :, :images], key[:, :, :images], value[:, :, :images], dropout_p=dropout))
        if images < length:
            if attention_mask is None:  # no padding: each caption query sees the keys up to its own
                mask = causal_lower_right(length - images, key.shape[2])
            else:
                mask = attention_mask[:, :, images:].to(query.dtype)
            with sdpa_kernel(CAPTION_KERNELS, set_priority=True):
                parts.append(F.scaled_dot_product_attention(
                    query[:, :, images:], key, value, attn_mask=mask, dropout_p=dropout))
        context = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return context.transpose(1, 2).reshape(batch, length, -1), None


def count_image_queries(git, args, kwargs):
    """GitModel's forward pre-hook: how many of this pass's queries are image tokens (all P of
    them when it is given pixel values, which it then prepends; none otherwise)."""
    pixels = kwargs.get("pixel_values", args[3] if len(args) > 3 else None)
    kwargs[IMAGE_QUERIES] = 0 if pixels is None else git.encoder.layer[0].attention.self.image_patch_tokens
    return args, kwargs


def use_sdpa(model):
    """Swap `model`'s attention for the fused one, in place; returns the model."""
    # The CLIP vision tower dispatches on its config; the value is not written by save_pretrained.
    model.git.image_encoder.config._attn_implementation = "sdpa"
    for layer in model.git.encoder.layer:
        if not isinstance(layer.attention.self, SdpaSelfAttention):
            layer.attention.self = SdpaSelfAttention(layer.attention.self)
    if count_image_queries not in model.git._forward_pre_hooks.values():
        model.git.register_forward_pre_hook(count_image_queries, with_kwargs=True)
    return model


def set_attention(model, name):
    """'sdpa' swaps in the fused attention; 'eager' keeps the model as transformers loaded it."""
    if name not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, not {name!r}")
    return use_sdpa(model) if name == "sdpa" else model
