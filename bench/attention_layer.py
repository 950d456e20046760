"""One attention layer of git-base, eager against sdpa (attention.py), forward and backward on the CPU.

    python bench/attention_layer.py

The text decoder's self-attention (batch 20, 197 image + 20 caption tokens, a few captions
padded, dropout 0.1 as git-base trains) and the vision tower's (197 tokens), in fp32 and under
bf16 autocast; milliseconds per forward + backward, the mean of 4 after one warm-up.
"""
import copy
import os
import sys
import time

import torch
from transformers import GitConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.git.modeling_git import GitSelfAttention, GitVisionAttention

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from captioning import attention  # noqa: E402

BATCH, IMAGE_TOKENS, CAPTION_TOKENS = 20, 197, 20


def ms_per_call(fn, n=4):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def forward_backward(module, *inputs, dtype=None):
    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = module(*inputs)[0]
        out.float().sum().backward()
    return step


def main():
    torch.manual_seed(0)
    config = GitConfig(vision_config=dict(hidden_size=768, num_attention_heads=12, image_size=224, patch_size=16))
    config._attn_implementation = "eager"
    length = IMAGE_TOKENS + CAPTION_TOKENS
    eager = GitSelfAttention(config, layer_idx=0).train()
    fused = attention.SdpaSelfAttention(copy.deepcopy(eager))
    hidden = torch.randn(BATCH, length, config.hidden_size, requires_grad=True)
    padding = torch.ones(BATCH, length, dtype=torch.long)
    padding[:5, -6:] = 0  # a quarter of the captions shorter than the longest
    image_block = torch.full((BATCH, length), -1)
    image_block[:, :IMAGE_TOKENS] = 0
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=padding, cache=None,
                              position_ids=None, block_sequence_ids=image_block)
    vision_config = config.vision_config
    vision = GitVisionAttention(vision_config).train()
    vision_hidden = torch.randn(BATCH, IMAGE_TOKENS, vision_config.hidden_size, requires_grad=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward + backward")
    for dtype in (None, torch.bfloat16):
        name = "bf16" if dtype else "fp32"
        times = {"decoder eager": ms_per_call(forward_backward(eager, hidden, mask, dtype=dtype)),
                 "decoder sdpa": ms_per_call(forward_backward(fused, hidden, mask, dtype=dtype))}
        for impl in ("eager", "sdpa"):
            vision_config._attn_implementation = impl
            times[f"vision {impl}"] = ms_per_call(forward_backward(vision, vision_hidden, dtype=dtype))
        print(name, " | ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
