"""recipes/alpaca_sft.py: paper defaults, YAML configs with command-line overrides, the Alpaca
template and data loading, and short end-to-end runs (tiny model; SmolLM2 in one slow test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import prune_magnitude_nm_
from datasets import Dataset
from fixtures_trainer import alpaca_records, save_tiny_base, single_thread  # noqa: F401
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from spp_hf import SPPModel
from spp_hf.data.training_data import load_sft_data

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def _recipe():
    spec = importlib.util.spec_from_file_location("alpaca_sft", ROOT / "recipes" / "alpaca_sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["alpaca_sft"] = module
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def parse(*argv: str):
    return recipe.make_parser().parse_args_and_config(list(argv))


def test_defaults_follow_the_paper_and_official_code():
    script, train, spp = parse("--output_dir", "/tmp/unused")
    assert script.dataset_name == "yahma/alpaca-cleaned" and script.train_on_inputs
    assert train.learning_rate == 4e-3 and train.warmup_steps == 0.03 and train.weight_decay == 0.001
    assert str(train.optim.value if hasattr(train.optim, "value") else train.optim) == "adamw_torch"
    assert str(getattr(train.lr_scheduler_type, "value", train.lr_scheduler_type)) == "linear"
    assert train.num_train_epochs == 3 and train.max_length == 512 and train.seed == 42
    config = spp.to_config()
    assert (config.r, config.scale, config.dropout) == (16, 2.0, 0.05)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_yaml_configs_load_and_the_command_line_overrides_them():
    script, train, spp = parse("--config", str(CONFIGS / "smollm2_135m.yaml"), "--learning_rate", "1e-3", "--spp_r", "8")
    assert script.model_name_or_path == "smollm2" and script.dataset_name == "bundled"
    assert train.max_steps == 30 and train.max_length == 256 and train.learning_rate == 1e-3 and spp.spp_r == 8
    assert spp.spp_dropout == 0.05 and not train.bf16
    script, train, spp = parse("--config", str(CONFIGS / "llama7b_wanda24.yaml"), "--bf16", "false")
    assert train.per_device_train_batch_size * train.gradient_accumulation_steps * 8 == 128
    assert train.num_train_epochs == 3 and train.max_length == 512 and train.learning_rate == 4e-3
    assert train.model_init_kwargs == {"dtype": "bfloat16"} and train.gradient_checkpointing
    assert script.eval_size == 2000 and train.load_best_model_at_end and spp.spp_r == 16


def test_alpaca_template_is_the_official_one():
    # Literal text of alpaca-lora's templates/alpaca.json, which the official SPP code uses.
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 3\n\n"
        "### Response:\n"
    )
    without = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Response:\n"
    )
    assert recipe.alpaca_prompt("Add.", "2 3") == with_input
    assert recipe.alpaca_prompt("Add.", "") == without
    rows = Dataset.from_list([{"instruction": "Add.", "input": "2 3", "output": "5"}])
    assert recipe.to_sft_format(rows)[0] == {"text": with_input + "5"}
    assert recipe.to_sft_format(rows, train_on_inputs=False)[0] == {"prompt": with_input, "completion": "5"}


def test_alpaca_data_from_json_jsonl_and_the_bundled_sample(tmp_path):
    records = alpaca_records(5)
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    for name in ("a.json", "a.jsonl"):
        data = recipe.load_alpaca(str(tmp_path / name))
        assert data[3] == records[3]
    bundled = recipe.load_alpaca("bundled", max_samples=7)
    assert len(bundled) == 7 and bundled[0]["instruction"] == records[0]["instruction"]
    assert len(recipe.load_alpaca("bundled")) == 500
    (tmp_path / "gpteacher.json").write_text(json.dumps([{"instruction": "i", "input": "", "response": "r"}]))
    assert recipe.load_alpaca(str(tmp_path / "gpteacher.json"))[0]["output"] == "r"
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(ValueError, match="not in Alpaca format"):
        recipe.load_alpaca(str(tmp_path / "bad.json"))


def test_sft_data_tells_alpaca_from_plain_text(tmp_path):
    records = alpaca_records(3)
    (tmp_path / "a.json").write_text(json.dumps(records))
    rows, packed = load_sft_data(str(tmp_path / "a.json"))
    assert not packed and rows[0] == {"text": recipe.alpaca_prompt(records[0]["instruction"], records[0]["input"]) + records[0]["output"]}
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}", "url": "u"}) for i in range(5)))
    rows, packed = load_sft_data(str(tmp_path / "t.jsonl"), max_samples=4)
    assert packed and rows.column_names == ["text"] and rows["text"] == ["doc 0", "doc 1", "doc 2", "doc 3"]
    c4, packed = load_sft_data("c4-sample")  # the calibration half of the bundled C4 sample; the rest is held out
    assert packed and len(c4) == 100 and all(len(t) > 0 for t in c4["text"])
    wiki, packed = load_sft_data("wiki-pretrain", max_samples=3)  # gzip-compressed JSON Lines
    assert packed and len(wiki) == 3 and wiki.column_names == ["text"] and all(len(t) > 200 for t in wiki["text"])
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(ValueError, match="neither Alpaca .* nor plain text.*question"):
        load_sft_data(str(tmp_path / "qa.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        load_sft_data(str(tmp_path / "missing.jsonl"))


def test_recipe_trains_a_tiny_pruned_base_with_completion_only_loss(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    trainer = recipe.main([
        "--config", str(CONFIGS / "smollm2_135m.yaml"), "--model_name_or_path", str(base), "--max_train_samples", "16",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "400", "--spp_r", "4",
        "--train_on_inputs", "false", "--logging_steps", "1", "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert trainer.completion_only_loss
    row = trainer.train_dataset[0]
    n = len(row["prompt"])  # the character tokenizer: one token per character
    assert row["labels"][:n] == [-100] * n and row["prompt"].startswith("Below is an instruction")
    merged = SPPModel.from_pretrained(tmp_path / "out", base_model=str(base))
    original = AutoModelForCausalLM.from_pretrained(base)
    w0 = original.model.layers[0].mlp.up_proj.weight
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight == 0, w0 == 0)
    assert (w0 == 0).float().mean() == 0.5


@pytest.mark.slow
def test_smollm2_recipe_runs_a_few_steps_on_a_pruned_copy(tmp_path, smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    prune_magnitude_nm_(model, 2, 4)
    base = tmp_path / "smollm2-2of4"
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(base)
    del model
    trainer = recipe.main([
        "--config", str(CONFIGS / "smollm2_135m.yaml"), "--model_name_or_path", str(base), "--max_train_samples", "16",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "96", "--logging_steps", "1",
        "--save_steps", "2", "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"spp_config.json", "spp_adapter.safetensors", "README.md", "checkpoint-2"} <= files
    size = (tmp_path / "out/spp_adapter.safetensors").stat().st_size
    assert size < 12e6  # α/β of 210 layers (≈2.5M fp32 values), nowhere near the 538 MB base
    state = load_file(tmp_path / "out/spp_adapter.safetensors")
    assert len(state) == 2 * 7 * 30
