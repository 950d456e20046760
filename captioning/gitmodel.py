"""Load a GIT captioner (Hub id or local folder), or build a tiny one from scratch for offline runs.

A tiny GIT is written to disk with `save_pretrained` and read back with `from_pretrained`, so the
offline demo and the tests go through exactly the code path a real checkpoint takes.
"""
import os

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoProcessor, BertTokenizerFast, GitConfig, GitForCausalLM, GitProcessor

from captioning.attention import set_attention
from captioning.checkpoint import damaged_file
from captioning.errors import ModelLoadError
from captioning.hub import looks_like_path
from captioning.presets import TINY_PRESETS, is_tiny


def build_tiny_git(captions, out_dir, preset="tiny", vocab_size=2000, seed=0):
    """Write a randomly initialised GIT plus a WordPiece tokenizer learned from `captions` to out_dir."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: GIT's pad id is 0
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    wordpiece.train_from_iterator(captions, trainer)
    tokenizer = BertTokenizerFast(vocab=wordpiece.get_vocab(), do_lower_case=True)

    cfg = TINY_PRESETS[preset]
    tokenizer.model_max_length = cfg.get("model_max_length", cfg["text"]["max_position_embeddings"])
    size = cfg["vision"]["image_size"]
    # Looked up here, not imported at the top: the lookup warns that torchvision is missing, and by now
    # the command has quieted transformers' logging.
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # A preset may ask for a larger output layer than the learned vocabulary (a real model's size).
    vocab = max(len(tokenizer), cfg.get("vocab_size", 0))
    config = GitConfig(
        vision_config=cfg["vision"], vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **cfg["text"],
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    # A ViT trained from scratch learns where things are very slowly from random position
    # embeddings; starting them at fixed 2-D sine-cosine codes (as MAE does) lets the small model
    # read positions from its first steps. They stay trainable.
    embeddings = model.git.image_encoder.vision_model.embeddings
    grid = cfg["vision"]["image_size"] // cfg["vision"]["patch_size"]
    with torch.no_grad():
        embeddings.position_embedding.weight[1:] = sincos_2d(grid, embeddings.embed_dim)
        embeddings.position_embedding.weight[0] = 0.0  # the class token has no place
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def sincos_2d(grid, dim):
    """(grid*grid, dim) codes: half the channels encode the row, half the column."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = axis[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def load_or_build_model(args, captions, resume_from=None, build=True, attention="eager"):
    """The checkpoint being resumed, a tiny GIT built for the training captions (a list of strings),
    or --model; raises ModelLoadError. build=False: another process builds the tiny GIT's folder."""
    if resume_from:
        return load_model(resume_from, trust_remote_code=args.trust_remote_code, attention=attention)
    if is_tiny(args.model):
        init_dir = os.path.join(args.output_dir, "init-model")
        if build:
            build_tiny_git(captions, init_dir, preset=args.model, seed=args.seed)
        return load_model(init_dir, attention=attention)
    return load_model(args.model, trust_remote_code=args.trust_remote_code, attention=attention)


def set_up_for_training(model, freeze_vision=False, gradient_checkpointing=False):
    """--freeze-vision: the image encoder's parameters ask for no gradient, so autograd records
    nothing inside it (it runs as under no_grad: no activations kept for backward, no gradients)
    and the optimizer, given only trainable parameters, holds no state for it and never changes
    it. The visual projection and the text decoder still train. The CLIP vision tower has no
    dropout, so it computes the same in train and eval mode.
    --gradient-checkpointing: every layer of both towers keeps only its input for backward and
    recomputes the rest there (non-reentrant checkpointing, which restores the RNG for dropout,
    so a step computes the same loss)."""
    if freeze_vision:
        model.git.image_encoder.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def load_model(name, dtype=None, trust_remote_code=False, attention="eager"):
    """AutoModelForCausalLM + AutoProcessor from a Hub id or a local folder; one-line errors.
    attention: "sdpa" swaps in the fused attention (attention.py), "eager" keeps transformers' own.
    Code shipped with a model (auto_map in its config) runs only with trust_remote_code=True."""
    if looks_like_path(name):
        if not os.path.isdir(name):
            raise ModelLoadError(f"model folder {name!r} does not exist")
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelLoadError(f"model folder {name!r} has no config.json (was it written by save_pretrained?)")
        problem = damaged_file(name)
        if problem:
            raise ModelLoadError(f"{problem}; the model folder cannot be loaded")
    try:
        # An explicit False: None would ask on the terminal whether to run the code.
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                     **({"dtype": dtype} if dtype else {}))
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise ModelLoadError(f"model {name!r} comes with its own Python code; pass --trust-remote-code to run it "
                             f"(only if you trust its author)") from None
    except OSError as e:
        if os.path.isdir(name):
            raise ModelLoadError(f"could not load model from folder {name!r}: {first_line(e)}") from None
        raise ModelLoadError(
            f"model {name!r} is not a local folder and could not be downloaded from the Hugging Face Hub "
            f"(offline and not cached, or no such repo); pass a folder written by save_pretrained") from None
    if model.config.model_type != "git":
        raise ModelLoadError(f"model {name!r} is a {model.config.model_type!r} model, not GIT")
    if model.generation_config.pad_token_id is None:  # batched generate pads finished captions
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return set_attention(model, attention), processor


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_model(name):
    """A train.py output folder means its best/ model."""
    best = os.path.join(name, "best")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")) and os.path.isdir(best):
        return best
    return name


def num_image_tokens(config):
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    return patches * (config.num_image_with_embedding or 1)
