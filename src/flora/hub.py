"""Models and adapters named by their Hugging Face id (``ORG/NAME``), found in the local Hugging Face cache.

The cache is huggingface_hub's (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, default
``~/.cache/huggingface/hub``), laid out as huggingface_hub lays it out: ``models--ORG--NAME/refs/main``
holds a commit hash and ``models--ORG--NAME/snapshots/<hash>/`` the files. Nothing is downloaded
unless asked: ``allow_download=True`` in Python, ``--allow-download`` on the command line, or
``FLORA_ALLOW_DOWNLOAD=1`` in the environment. A download fetches only what a model or an adapter
needs (configs, tokenizer files, safetensors weights: never pickles).
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir, snapshot_download
from huggingface_hub.errors import CacheNotFound, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

ALLOW_DOWNLOAD_ENV = "FLORA_ALLOW_DOWNLOAD"
# The files a transformers model or a PEFT adapter is read from.
FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """``allow_download`` when given, else whether ``$FLORA_ALLOW_DOWNLOAD`` is ``1``/``true``/``yes``."""
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def hub_cache() -> Path:
    """The Hugging Face cache directory huggingface_hub reads (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    return Path(constants.HF_HUB_CACHE)


def cached_models() -> list[str]:
    """The ids of the model repositories in the local Hugging Face cache (adapters included: the hub
    does not tell them apart), sorted."""
    try:
        info = scan_cache_dir(hub_cache())
    except CacheNotFound:
        return []
    return sorted(repo.repo_id for repo in info.repos if repo.repo_type == "model")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a valid Hugging Face repository id (``ORG/NAME`` or ``NAME``)."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def snapshot(repo_id: str, what: str = "model", allow_download: bool | None = None, hint: str = "") -> Path:
    """The local directory of ``repo_id``'s ``main`` revision in the Hugging Face cache.

    Args:
        repo_id: ``ORG/NAME``.
        what: ``"model"`` or ``"adapter"``, for the error message.
        allow_download: fetch it into the cache when it is not there (default: ``$FLORA_ALLOW_DOWNLOAD``).
        hint: a sentence added to the error when it is not in the cache.

    Raises:
        FileNotFoundError: not in the cache and downloading not allowed; the message names the cache
            directory and how to allow the download.
    """
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        if not downloads_allowed(allow_download):
            raise FileNotFoundError(
                f"{what} {repo_id!r} is not in the local Hugging Face cache ({hub_cache()}) and flora downloads "
                f"nothing unless asked: pass --allow-download (Python: allow_download=True, or set "
                f"{ALLOW_DOWNLOAD_ENV}=1) to fetch it from the Hugging Face Hub{hint}"
            ) from None
    return Path(snapshot_download(repo_id, allow_patterns=FILE_PATTERNS))


def resolve_adapter_dir(path_or_id: str | os.PathLike, allow_download: bool | None = None) -> Path:
    """An adapter directory: ``path_or_id`` itself when it is a directory (or not a hub id: the reader
    then says what is missing), else its snapshot in the Hugging Face cache (`snapshot`)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir() or path.exists() or not is_hub_id(str(path_or_id)):
        return path
    return snapshot(str(path_or_id), "adapter", allow_download)
