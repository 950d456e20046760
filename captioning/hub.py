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

