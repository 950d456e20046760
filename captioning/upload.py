"""train.py --push-to-hub: whether an upload can work from here (checked before training), and the upload.
"""
import huggingface_hub

from captioning.hub import hub_reachable


def push_problem():
    """Why --push-to-hub cannot work from here (no token, no network), or None. Checked before training."""
    if huggingface_hub.get_token() is None:
        return "not logged in to the Hugging Face Hub (run `hf auth login` or set HF_TOKEN)"
    if not hub_reachable():
        return "the Hugging Face Hub cannot be reached from here (offline, or HF_HUB_OFFLINE is set)"
    return None


def push_folder(folder, repo_id, message):
    """Upload a model folder to repo_id (created if missing); returns None or a one-line reason."""
    try:
        api = huggingface_hub.HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except Exception as e:  # HTTP, auth and network errors all mean: not uploaded this time
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"
    return None
