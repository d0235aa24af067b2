"""Plain text shipped with spp-hf, by name, split so that no document is both trained on and evaluated.

Names (use them as `train.data`, `prune.calibration` or held-out evaluation texts in `spp-hf run`):

- ``wiki-pretrain``: 1000 English Wikipedia articles (516k SmolLM2 tokens), recovery training text.
- ``wiki-validation``: 396 other Wikipedia articles (218k tokens), for tuning and evaluation only.
- ``c4-sample``: the first 100 documents of the bundled C4 sample (59k tokens): calibration (and
  training, if asked for).
- ``c4-heldout``: its last 100 documents (55k tokens): non-Wikipedia text that no stage of the
  pipeline sees before evaluation.

Provenance and licences: ``spp_hf/data/pretrain/SOURCES.md`` and ``spp_hf/data/calib/SOURCES.md``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
C4_SAMPLE_FILE = DATA_DIR / "calib" / "c4_demo.jsonl"
C4_CALIBRATION_DOCS = 100  # documents [0, 100) calibrate; [100, 200) are held out
WIKI_TRAIN_FILE = DATA_DIR / "pretrain" / "wikipedia_en_train_1000.jsonl.gz"
WIKI_VALIDATION_FILE = DATA_DIR / "pretrain" / "wikipedia_en_validation.jsonl.gz"

# name -> (file, first document, end document or None for the rest)
CORPORA: dict[str, tuple[Path, int, int | None]] = {
    "wiki-pretrain": (WIKI_TRAIN_FILE, 0, None),
    "wiki-validation": (WIKI_VALIDATION_FILE, 0, None),
    "c4-sample": (C4_SAMPLE_FILE, 0, C4_CALIBRATION_DOCS),
    "c4-heldout": (C4_SAMPLE_FILE, C4_CALIBRATION_DOCS, None),
}
HELDOUT = ("wiki-validation", "c4-heldout")  # never trained on or calibrated with by the pipeline
BUNDLED_ALPACA = DATA_DIR / "alpaca" / "alpaca_sample_500.json"
# every bundled data name -> its file ("bundled" is the Alpaca sample; the rest are the corpora above)
BUNDLED = {"bundled": BUNDLED_ALPACA, **{name: path for name, (path, _, _) in CORPORA.items()}}


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON Lines file, gzip-compressed when its name ends in .gz."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def documents(name: str) -> list[str]:
    """The texts of a bundled corpus (see the module docstring for the names)."""
    if name not in CORPORA:
        raise ValueError(f"No bundled corpus named {name!r}; known: {sorted(CORPORA)}.")
    path, first, end = CORPORA[name]
    return [row["text"] for row in read_jsonl(path)[first:end]]
