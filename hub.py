"""Tell local paths from Hugging Face Hub ids, and fail fast when the Hub cannot be reached.

Without network the Hub client retries every file for minutes before it gives up. One quick
connection test at start-up puts the libraries in offline mode instead: they then use the local
cache, and a name that is not cached fails at once with our one-line error.
"""
import os
import socket
from urllib.parse import urlparse


def looks_like_path(name):
    """A local path rather than a Hub id ("owner/name" has at most one slash and no leading dot)."""
    return os.path.exists(name) or name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1


def hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection proves nothing; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_unless_needed(*names):
    """Call before importing transformers/datasets: offline mode when a Hub name is asked for
    but the Hub is out of reach (or when no Hub name is asked for at all)."""
    if all(looks_like_path(n) for n in names) or not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"


def push_problem():
    """Why --push-to-hub cannot work from here (no token, no network), or None. Checked before training."""
    from huggingface_hub import get_token

    if get_token() is None:
        return "not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)"
    if not hub_reachable():
        return "the Hugging Face Hub cannot be reached from here (offline, or HF_HUB_OFFLINE is set)"
    return None


def push_folder(folder, repo_id, message):
    """Upload a model folder to repo_id (created if missing); returns None or a one-line reason."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except Exception as e:  # HTTP, auth and network errors all mean: not uploaded this time
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"
    return None
