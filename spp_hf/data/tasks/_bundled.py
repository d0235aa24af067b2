"""Dataset loader for spp-hf's bundled zero-shot tasks (referenced from the task YAMLs with `!function`).

lm-eval calls it as `custom_dataset(**metadata, **dataset_kwargs)`, so it reads the bundled llm-foundry
jsonl file named by `file` and returns a `DatasetDict` with a single `test` split, without touching the
network or the `datasets` cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "zeroshot"


def load(file: str, **_: Any):
    """The bundled subset `file` (e.g. "arc_easy.jsonl") as DatasetDict({"test": ...})."""
    import datasets

    path = DATA_DIR / file
    if not path.is_file():
        raise FileNotFoundError(f"Bundled zero-shot file {path} is missing: reinstall spp-hf.")
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
