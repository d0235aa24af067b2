"""Calibration data for Wanda/SparseGPT: `nsamples` random windows of `seqlen` tokens.

Sources:
- None: the C4 shard Wanda and SparseGPT calibrate on (`allenai/c4`, `en/c4-train.00000-of-01024.json.gz`),
  downloaded through `datasets` (needs internet). Windows are drawn as in Wanda: a random document longer than
  `seqlen` tokens, then a random window inside it.
- a Hub dataset id: its `train` split's `text` column, sampled the same way.
- a local `.jsonl` / `.json` file (objects with a "text" field) or any other text file, or an in-memory
  `datasets.Dataset` with a "text" column: the documents are joined with blank lines into one token stream
  and the windows are drawn from it, so small corpora of short documents work too.
- a 2-D tensor of token ids (already tokenized), used as is (its first `nsamples` rows, first `seqlen` tokens).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

C4_REPO = "allenai/c4"
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
DEFAULT_CALIBRATION = f"{C4_REPO} ({C4_TRAIN_SHARD})"
MAX_DRAWS_PER_SAMPLE = 1000


@dataclass
class CalibrationData:
    """Token windows (nsamples, seqlen) plus a one-line description of where they came from."""

    input_ids: torch.Tensor
    description: str


def load_calibration(
    calibration: str | os.PathLike | Any | None,
    tokenizer: Any | None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> CalibrationData:
    """Draw `nsamples` windows of `seqlen` tokens from `calibration` (see the module docstring)."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive (got nsamples={nsamples}, seqlen={seqlen}).")
    if isinstance(calibration, torch.Tensor):
        return _from_tensor(calibration, nsamples, seqlen)
    if tokenizer is None:
        raise ValueError("Text calibration data needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
    rng = random.Random(seed)
    suffix = f"{nsamples} x {seqlen} tokens, seed {seed}"
    if calibration is None:
        texts = _load_hub_texts(C4_REPO)
        ids = _document_windows(texts, tokenizer, nsamples, seqlen, rng, DEFAULT_CALIBRATION)
        return CalibrationData(ids, f"{DEFAULT_CALIBRATION}, {suffix}")
    if _is_dataset(calibration):
        texts = _text_column(calibration, "the calibration Dataset")
        ids = _stream_windows(texts, tokenizer, nsamples, seqlen, rng, "the calibration Dataset")
        return CalibrationData(ids, f"datasets.Dataset ({len(texts)} rows), {suffix}")
    path = Path(calibration)
    if path.is_file():
        texts = read_text_file(path)
        ids = _stream_windows(texts, tokenizer, nsamples, seqlen, rng, str(path))
        return CalibrationData(ids, f"{path.name}, {suffix}")
    if path.exists():
        raise ValueError(f"Calibration path {path} is not a file: give a .jsonl/.json/.txt file or a Hub dataset id.")
    if path.suffix in (".jsonl", ".json", ".txt") or str(calibration).startswith((".", "/", "~")):
        raise ValueError(f"Calibration file {path} does not exist.")
    texts = _load_hub_texts(str(calibration))
    ids = _document_windows(texts, tokenizer, nsamples, seqlen, rng, str(calibration))
    return CalibrationData(ids, f"{calibration} (train), {suffix}")


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Documents of a local file: the "text" field of each JSON Lines row / JSON array item, else the whole file."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(raw)
        rows = rows if isinstance(rows, list) else [rows]
    else:
        return [raw] if raw.strip() else []
    texts = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "text" not in row:
            keys = list(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"Row {i} of {path} has no 'text' field (found {keys}); calibration files need {{\"text\": ...}} rows.")
        texts.append(row["text"])
    return texts


def _from_tensor(ids: torch.Tensor, nsamples: int, seqlen: int) -> CalibrationData:
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"A calibration tensor must be 2-D integer token ids (nsamples, seqlen); got {ids.dtype} {tuple(ids.shape)}.")
    if ids.shape[0] < nsamples or ids.shape[1] < seqlen:
        raise ValueError(
            f"The calibration tensor has shape {tuple(ids.shape)} but {nsamples} samples of {seqlen} tokens were asked for: "
            "lower nsamples/seqlen or give more tokens."
        )
    return CalibrationData(ids[:nsamples, :seqlen].long(), f"token tensor, {nsamples} x {seqlen} tokens")


def _is_dataset(obj: Any) -> bool:
    """Whether `obj` is a `datasets.Dataset`, without importing `datasets` (about 80 MB resident, for the rest of a
    prune) when nothing imported it: then no Dataset can exist."""
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, getattr(datasets, "Dataset", ()))


def _text_column(dataset: Any, what: str) -> Sequence[str]:
    if "text" not in dataset.column_names:
        raise ValueError(f"{what} has no 'text' column (columns: {dataset.column_names}).")
    return dataset["text"]


def _load_hub_texts(repo_id: str) -> Sequence[str]:
    import datasets

    kwargs = {"data_files": {"train": C4_TRAIN_SHARD}} if repo_id == C4_REPO else {}
    try:
        dataset = datasets.load_dataset(repo_id, split="train", **kwargs)
    except Exception as err:
        raise ValueError(
            f"Could not load calibration data {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Offline? Pass a local .jsonl/.txt file instead (--calib PATH or calibration=PATH)."
        ) from err
    return _text_column(dataset, f"Hub dataset {repo_id!r}")


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, verbose=False)["input_ids"]


def _document_windows(texts: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random, what: str) -> torch.Tensor:
    """Wanda's sampler: a random document with more than seqlen tokens, then a random window in it."""
    if len(texts) == 0:
        raise ValueError(f"Calibration data {what} is empty.")
    windows = []
    for _ in range(nsamples):
        for _ in range(MAX_DRAWS_PER_SAMPLE):
            ids = _tokenize(tokenizer, texts[rng.randint(0, len(texts) - 1)])
            if len(ids) > seqlen:
                break
        else:
            raise ValueError(
                f"No document of {what} longer than seqlen={seqlen} tokens was found in {MAX_DRAWS_PER_SAMPLE} draws: "
                "lower --seqlen or use longer calibration texts."
            )
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def _stream_windows(texts: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random, what: str) -> torch.Tensor:
    """Join all documents with blank lines, tokenize once, draw nsamples random windows."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"Calibration data {what} is empty (no non-blank text).")
    ids = _tokenize(tokenizer, "\n\n".join(texts))
    if len(ids) < seqlen:
        raise ValueError(
            f"Calibration data {what} has only {len(ids)} tokens, fewer than seqlen={seqlen}: "
            "lower --seqlen or give more text."
        )
    starts = [rng.randint(0, len(ids) - seqlen) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)
