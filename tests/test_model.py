import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, GitForCausalLM

from captioning import synthetic
from captioning.hub import looks_like_path
from conftest import ROOT
from captioning.errors import ModelLoadError
from captioning.gitmodel import load_model


def test_tiny_git_round_trips_through_from_pretrained(tiny_model_dir):
    model, processor = load_model(tiny_model_dir)
    assert isinstance(model, GitForCausalLM)
    tok = processor.tokenizer
    ids = tok("A small RED circle at the top left")["input_ids"]
    assert ids[0] == tok.cls_token_id == model.config.bos_token_id
    assert ids[-1] == tok.sep_token_id == model.config.eos_token_id
    assert tok.pad_token_id == model.config.pad_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "a small red circle at the top left"
    assert "[UNK]" not in tok.convert_ids_to_tokens(ids)
    pixels = processor(images=[synthetic.scene(0, 0)[0]], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 64, 64)
    # The same files load with the plain Auto classes a Hub user would call.
    again = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    AutoProcessor.from_pretrained(tiny_model_dir)
    assert list(model.state_dict()) == list(again.state_dict())
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_tiny_vit_positions_start_as_sine_cosine_codes(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    pos = model.git.image_encoder.vision_model.embeddings.position_embedding.weight
    assert torch.all(pos[0] == 0)
    # 8 x 8 patches, all with distinct codes of equal norm
    assert torch.cdist(pos[1:], pos[1:]).fill_diagonal_(1).min() > 0.1
    torch.testing.assert_close(pos[1:].norm(dim=1), pos[1:].norm(dim=1).mean().expand(64))


def test_missing_or_unreachable_models_are_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "absent"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="'nobody/no-such-git' is not a local folder") as e:
        load_model("nobody/no-such-git")  # the tests run with HF_HUB_OFFLINE=1
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,local", [("microsoft/git-base", False), ("git-base", False), ("./git-base", True),
                                        ("/abs/model", True), ("out/run/best", True), ("folder/", True)])
def test_local_paths_are_told_from_hub_ids(name, local):
    assert looks_like_path(name) == local


def test_the_same_seed_builds_the_same_tiny_git_in_every_process(tmp_path, tiny_model_dir):
    # The WordPiece trainer breaks ties between merges differently in each process (the learned
    # pieces differ, with Python's string hashing); the ids of the words the captions use, and so
    # the model, must not. This session's tiny GIT against one built in a process of another hash seed.
    script = ("import sys, json\nfrom captioning import synthetic\nfrom captioning.gitmodel import build_tiny_git\n"
              "from transformers import AutoTokenizer\n"
              "caps = [synthetic.scene(0, i)[1] for i in range(300)]\n"
              "t = AutoTokenizer.from_pretrained(build_tiny_git(caps, sys.argv[1], seed=0))\n"
              "print(json.dumps(t(caps)['input_ids']))\n")
    other = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": str(hash("seed") % 1000 + 1)})
    assert other.returncode == 0, other.stderr
    captions = [synthetic.scene(0, i)[1] for i in range(300)]  # as conftest's tiny_model_dir learned them
    assert json.loads(other.stdout) == AutoTokenizer.from_pretrained(tiny_model_dir)(captions)["input_ids"]
    theirs, ours = (load_file(os.path.join(folder, "model.safetensors")) for folder in (tmp_path / "m", tiny_model_dir))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
