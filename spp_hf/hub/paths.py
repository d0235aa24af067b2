"""Local paths and Hub repo ids: telling one from the other, and the one scrubber that keeps this machine's
paths out of anything published (cards, sparsity.json)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w\-.]*/)?[A-Za-z0-9][\w\-.]{0,95}$")


def is_hub_id(name: str | None) -> bool:
    """A Hub repo id (`name` or `namespace/name`), not a path on this machine."""
    if not name or os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")):
        return False
    return bool(_REPO_ID_RE.match(name)) and ".." not in name


_ABS_PATH_RE = re.compile(r"(?<![\w.:/~-])/(?:[\w.+@-]+/)*[\w.+@-]+")
_LOCAL_FOLDER_RE = re.compile(r"`([^`\n]+)` \(a local folder\)")


def _is_local_path(value: str) -> bool:
    return len(value) > 1 and ("/" in value or os.sep in value) and os.path.exists(os.path.expanduser(value))


def strip_local_paths(text: str) -> tuple[str, list[str]]:
    """`text` without paths of this machine (absolute paths that exist here, and the cards' "(a local folder)")."""
    found: list[str] = []

    def drop(match: re.Match, keep: str) -> str:
        found.append(match.group(1) if match.groups() else match.group(0))
        return keep

    text = _LOCAL_FOLDER_RE.sub(lambda m: drop(m, "a local folder (not published)"), text)
    text = _ABS_PATH_RE.sub(lambda m: drop(m, Path(m.group(0)).name) if _is_local_path(m.group(0)) else m.group(0), text)
    return text, found


def without_local_paths(value: Any) -> tuple[Any, list[str]]:
    """JSON data with every string naming an existing local path replaced by None, and those paths."""
    if isinstance(value, dict):
        pairs = [(k, without_local_paths(v)) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, paths) in pairs for p in paths]
    if isinstance(value, list):
        items = [without_local_paths(v) for v in value]
        return [v for v, _ in items], [p for _, paths in items for p in paths]
    if isinstance(value, str) and _is_local_path(value):
        return None, [value]
    return value, []
