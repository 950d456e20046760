"""Built-in names that need no download: the models train.py can build from scratch (--model tiny,
--model base-scratch) and the drawn scenes (--dataset synthetic)."""

SYNTHETIC = "synthetic"  # --dataset synthetic: captioned scenes drawn by synthetic.py

# GIT tiny presets: a ViT over 64 px images in 8 px patches (65 image tokens) and a small decoder.
# Sized so the synthetic demo learns to caption in a few CPU minutes.
TINY_PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=192, intermediate_size=576, num_hidden_layers=3, num_attention_heads=4,
                    image_size=64, patch_size=8),
        text=dict(hidden_size=192, intermediate_size=576, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128),
    ),
    # microsoft/git-base's architecture (GitConfig's defaults), randomly initialised: for measuring
    # speed at the real size offline. The output layer keeps git-base's 30522 rows although the
    # learned tokenizer is far smaller, and captions pad to 512 as git-base's processor says.
    "base-scratch": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                  max_position_embeddings=1024),
        vocab_size=30522,
        model_max_length=512,
    ),
}


def is_tiny(name):
    return name in TINY_PRESETS
