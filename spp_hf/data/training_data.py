"""Training data: Alpaca (the prompt template of the paper's official code) or plain text, as TRL rows."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from .corpora import BUNDLED, CORPORA, documents

# Every name of data shipped with spp-hf (the corpora are parts of files: see spp_hf.data.corpora).

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example (with or without the optional input)."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_records(name: str, split: str = "train") -> Dataset:
    """Rows of a local JSON/JSONL file, of bundled data ('bundled', or a corpus of `spp_hf.data.corpora`), or of a Hub dataset."""
    if name in CORPORA:
        return Dataset.from_dict({"text": documents(name)})
    path = Path(BUNDLED.get(name, name)).expanduser()
    if path.is_file():
        return load_dataset("json", data_files=str(path), split="train")
    if path.suffix in (".json", ".jsonl", ".gz"):
        raise FileNotFoundError(f"Training data file {path} does not exist.")
    return load_dataset(name, split=split)


def is_alpaca(data: Dataset) -> bool:
    """Whether rows look like Alpaca (instruction + output, or GPTeacher's response) rather than plain text."""
    return "instruction" in data.column_names and ({"output", "response"} & set(data.column_names)) != set()


def load_alpaca(name: str = "bundled", split: str = "train", max_samples: int | None = None) -> Dataset:
    """Alpaca records from the Hub, a local JSON/JSONL file, or 'bundled' (500 examples shipped with spp-hf)."""
    return _checked_alpaca(load_records(name, split), name, max_samples)


def _checked_alpaca(data: Dataset, name: str, max_samples: int | None) -> Dataset:
    if "output" not in data.column_names and "response" in data.column_names:
        data = data.rename_column("response", "output")
    missing = {"instruction", "output"} - set(data.column_names)
    if missing:
        raise ValueError(
            f"{name} is not in Alpaca format: missing columns {sorted(missing)} (found {data.column_names}). "
            "Expected instruction, input (optional) and output."
        )
    return _first(data, max_samples)


def _first(data: Dataset, max_samples: int | None) -> Dataset:
    return data if max_samples is None else data.select(range(min(max_samples, len(data))))


def to_sft_format(data: Dataset, train_on_inputs: bool = True) -> Dataset:
    """Alpaca records → TRL rows: ``text`` (loss on everything) or ``prompt``/``completion`` (response only)."""

    def convert(example: dict) -> dict:
        prompt = alpaca_prompt(example["instruction"], example.get("input"))
        if train_on_inputs:
            return {"text": prompt + example["output"]}
        return {"prompt": prompt, "completion": example["output"]}

    return data.map(convert, remove_columns=data.column_names, desc="Alpaca prompt template")


def load_sft_data(name: str = "bundled", split: str = "train", max_samples: int | None = None) -> tuple[Dataset, bool]:
    """TRL rows for `name` and whether they are plain text (to pack) rather than templated Alpaca examples.

    Alpaca rows (instruction/input/output) get the paper's prompt; rows with only a ``text`` field (C4-style
    documents, e.g. the bundled 'c4-sample') are used as they are, for language modelling on every token.
    """
    data = load_records(name, split)
    if is_alpaca(data):
        return to_sft_format(_checked_alpaca(data, name, max_samples)), False
    if "text" not in data.column_names:
        raise ValueError(
            f"{name} is neither Alpaca (instruction, input, output) nor plain text (a 'text' column); "
            f"found columns {data.column_names}."
        )
    return _first(data.select_columns(["text"]), max_samples), True
