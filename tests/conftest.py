"""Offline fixtures: a tiny GIT saved with save_pretrained, and synthetic datasets on disk."""
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# No test may touch the network: the Hub is unreachable here and in CI.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The preprocessed-image cache of this test session (subprocesses inherit it), not the user's.
os.environ["GIT_CAPTION_CACHE"] = tempfile.mkdtemp(prefix="git-caption-cache-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["GIT_CAPTION_CACHE"], ignore_errors=True)

import data  # noqa: E402
from model import build_tiny_git  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny GIT with a WordPiece tokenizer learned from synthetic captions."""
    out = str(tmp_path_factory.mktemp("tiny-git"))
    captions = [data.synthetic_scene(0, i)[1] for i in range(300)]
    return build_tiny_git(captions, out, seed=0)


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    """40 synthetic scenes written as an HF imagefolder (PNG files + metadata.jsonl)."""
    out = str(tmp_path_factory.mktemp("imagefolder"))
    data.write_imagefolder(data.synthetic_dataset(40, seed=1), out)
    return out
