"""Checkpoints named by a Hugging Face Hub repository id (``"org/name"``), as transformers takes them.

``checkpoint_folder`` gives a local folder either way: a folder that exists is used as it is; otherwise
the name is a repository id, and the files qpass reads (configs, safetensors weights, tokenizer files)
are fetched into the Hub cache with ``huggingface_hub.snapshot_download`` (``HF_HOME``/``HF_HUB_CACHE``
place the cache, ``HF_TOKEN`` or ``huggingface-cli login`` gives access, ``HF_HUB_OFFLINE=1`` reads
only the cache). Pickled weights (``*.bin``, ``*.pt``, ``*.pth``) are never fetched.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

# Everything a checkpoint folder holds that qpass or a tokenizer reads; no pickle.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
CONFIG_FILES = ("config.json",)  # what qpass.estimate reads


def checkpoint_folder(path_or_repo_id: str | Path, revision: str | None = None,
                      files: tuple[str, ...] = CHECKPOINT_FILES) -> Path:
    """The local folder of ``path_or_repo_id``: the folder itself, or the Hub repository's ``files``
    (glob patterns) in the cache, at ``revision`` (a branch, tag or commit; default the main branch)."""
    path = Path(path_or_repo_id)
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"{path}: a local folder has no revisions; revision={revision!r} is for a "
                                  "Hugging Face Hub repository id")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo_id = str(path_or_repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except HFValidationError:
        raise CheckpointError(f"{repo_id}: no such checkpoint folder, and not a Hugging Face Hub repository id "
                              "(org/name)") from None
    except OSError as err:  # huggingface_hub's errors (offline, not found, gated, network) are OSErrors
        raise CheckpointError(f"{repo_id}: no such checkpoint folder, and the Hugging Face Hub repository of that "
                              f"name could not be fetched ({type(err).__name__}: {err})") from err
