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
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right


ATTENTIONS = ("sdpa", "eager")


class SdpaSelfAttention(nn.Module):
    """GitSelfAttention's parameters and inputs, computed by scaled_dot_product_attention."""

    def __init__(self, eager):
        super().__init__()
        # The same Linear modules under the same names: the state dict does not change.
        self.query, self.key, self.value = eager.query, eager.key, eager.value
        self.dropout = eager.dropout  # its p, applied to the attention probabilities as eager does
        self.layer_idx = eager.layer_idx
        self.head_size = eager.attention_head_size
        # GitModel reads this name to widen the padding mask over the cached image tokens.
        self.image_patch_tokens = eager.image_patch_tokens
        self.train(eager.training)  # a model swapped after .eval() must not start applying dropout

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        heads = (batch, length, -1, self.head_size)
        query = self.query(hidden_states).view(heads).transpose(1, 2)
        key = self.key(hidden_states).view(heads).transpose(1, 2)
        value = self.value(hidden_states).view(heads).transpose(1, 2)
        if cache is not None:  # generate: the image keys/values sit in the cache from the first pass on
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        dropout = self.dropout.p if self.training else 0.0
        # The first pass holds the image tokens' queries; later passes of generate only new caption tokens.
        images = max(0, self.image_patch_tokens - (key.shape[2] - length))
        parts = []
        if images:
            image_keys = slice(0, self.image_patch_tokens)
            parts.append(F.scaled_dot_product_attention(
                query[:, :, :images], key[:, :, image_keys], value[:, :, image_keys], dropout_p=dropout))
        if images < length:
            if attention_mask is None:  # no padding: each caption query sees the keys up to its own
                mask = causal_lower_right(length - images, key.shape[2])
            else:
                mask = attention_mask[:, :, images:].to(query.dtype)
            parts.append(F.scaled_dot_product_attention(
                query[:, :, images:], key, value, attn_mask=mask, dropout_p=dropout))
        context = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return context.transpose(1, 2).reshape(batch, length, -1), None


def use_sdpa(model):
    """Swap `model`'s attention for the fused one, in place; returns the model."""
    # The CLIP vision tower dispatches on its config; the value is not written by save_pretrained.
    model.git.image_encoder.config._attn_implementation = "sdpa"
    for layer in model.git.encoder.layer:
        if not isinstance(layer.attention.self, SdpaSelfAttention):
            layer.attention.self = SdpaSelfAttention(layer.attention.self)
    return model


def set_attention(model, name):
    """'sdpa' swaps in the fused attention; 'eager' keeps the model as transformers loaded it."""
    if name not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, not {name!r}")
    return use_sdpa(model) if name == "sdpa" else model
