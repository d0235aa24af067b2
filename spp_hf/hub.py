"""Hub I/O for adapters, pruned bases and merged models."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download


def download_adapter(repo_id: str, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Local snapshot of an adapter repo (only the adapter files)."""
    return Path(
        snapshot_download(repo_id, revision=revision, token=token, allow_patterns=["spp_config.json", "spp_adapter.safetensors", "README.md"])
    )
