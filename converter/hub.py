"""Resolve a SRC argument: a local path, or a hub id fetched with huggingface_hub (only the files pgconv needs).

huggingface_hub reads `HF_HUB_OFFLINE`, `HF_TOKEN` and `HF_HOME`/`HF_HUB_CACHE` itself; an offline miss, an
unknown or gated repo, or a network failure becomes one `InputError` line.
"""

from __future__ import annotations

import re
from pathlib import Path

from pgconv.converter.checkpoint import default_trusted_root
from pgconv.errors import InputError

__all__ = ["resolve_source", "HUB_ID", "NEEDED_FILES"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Weights, index, configs, tokenizer and processor files; `.bin` weights only if a repo has no safetensors.
NEEDED_FILES = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
BIN_FILES = ["pytorch_model*.bin"]


def resolve_source(src: str | Path) -> tuple[Path, Path]:
    """(local path, trusted root for paths inside it). A hub snapshot's trusted root is the repo's cache folder,
    because snapshot files are symlinks into its `blobs/`."""
    path = Path(src)
    if path.exists() or not HUB_ID.match(str(src)):
        return path, default_trusted_root(path if path.is_dir() else path.parent)
    snapshot = _download(str(src), NEEDED_FILES)
    if not any(snapshot.glob("*.safetensors")):
        snapshot = _download(str(src), NEEDED_FILES + BIN_FILES)
    return snapshot, snapshot.parent.parent


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except hf.GatedRepoError:
        raise InputError(f"{repo_id}: gated repository; accept its licence on the hub and set HF_TOKEN") from None
    except hf.RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such local path, and no such hub repository (or it is private: set HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise InputError(f"{repo_id}: revision not found on the hub") from None
    except hf.LocalEntryNotFoundError:
        raise InputError(f"{repo_id}: no such local path, not in the hub cache, and the hub cannot be reached "
                         "(offline: HF_HUB_OFFLINE is set or there is no network)") from None
    except (hf.HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{repo_id}: hub download failed ({first})") from None
