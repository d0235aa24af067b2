"""`spp-hf run` end to end on a fast configuration: a tiny Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from spp_hf.cli import main as cli_main
from spp_hf.pipeline import PipelineConfig, apply_overrides, gap_closed
from spp_hf.sparsity import iter_linear_weights


@pytest.fixture(scope="module")
def tiny_dense(smollm2_dir, tmp_path_factory):
    """A tiny random Llama that speaks SmolLM2's vocabulary, saved as a normal checkpoint."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tok), "max_position_embeddings": 512}))
    path = tmp_path_factory.mktemp("tiny_dense")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


FAST = [
    "prune.nsamples=4", "prune.seqlen=64", "train.max_steps=4", "train.batch_size=2", "train.max_length=64",
    "train.save_steps=2", "train.max_samples=16", "eval.ppl_seqlen=128", "eval.ppl_windows=2",
    "eval.tasks=spp_copa", "eval.limit=4",
]  # fmt: skip


def test_pipeline_runs_resumes_and_keeps_zeros(tiny_dense, tmp_path):
    args = ["run", "--set", f"model={tiny_dense}", "--set", f"output_dir={tmp_path}", "--set", "name=fast"]
    for item in FAST:
        args += ["--set", item]
    assert cli_main(args) == 0
    run = tmp_path / "fast"
    for part in ("pruned/sparsity.json", "spp/adapter/spp_adapter.safetensors", "spp/merged/config.json",
                 "lora_star/merged/config.json", "eval/spp.json", "report.md", "loss.png", "perplexity.png", "sparsity.png"):  # fmt: skip
        assert (run / part).exists(), part
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned")
    for variant in ("spp", "lora_star"):  # plain transformers loads the merged models, with the base's zeros
        merged = AutoModelForCausalLM.from_pretrained(run / variant / "merged")
        base_w = dict(iter_linear_weights(pruned))
        for name, w in iter_linear_weights(merged):
            assert torch.equal(w == 0, base_w[name] == 0), (variant, name)
        assert any((w == 0).float().mean() > 0.49 for _, w in iter_linear_weights(merged))
    results = {v: json.loads((run / "eval" / f"{v}.json").read_text()) for v in ("dense", "pruned", "spp", "lora_star")}
    assert all(math.isfinite(r["ppl"]) and r["ppl_windows"] == 2 for r in results.values())
    assert 0.0 <= results["spp"]["zero_shot"]["spp_copa"]["acc"] <= 1.0
    report = (run / "report.md").read_text()
    assert "identical to" in report and "LoRA*" in report and "language-modelling loss" in report
    losses = json.loads((run / "spp" / "train" / "loss_history.json").read_text())
    assert [s for s, _ in losses] == [1, 2, 3, 4]

    # a second run skips every finished stage: nothing is retrained or re-evaluated
    stamp = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    assert cli_main(args) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}


def test_pipeline_trains_on_packed_plain_text(tiny_dense, tmp_path):
    """Plain-text rows (train.data=<jsonl of {"text"}>) are packed into full max_length sequences."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Short document number {i} about pruning."}) for i in range(200)))
    args = ["run", "--set", f"model={tiny_dense}", "--set", f"output_dir={tmp_path}", "--set", "name=text", "--skip", "eval"]
    for item in FAST + [f"train.data={docs}", "train.max_steps=2", "train.max_samples=null"]:
        args += ["--set", item]
    assert cli_main(args) == 0
    for variant in ("spp", "lora_star"):
        state = json.loads(next((tmp_path / "text" / variant / "train").glob("checkpoint-*/trainer_state.json")).read_text())
        tokens = [h["num_tokens"] for h in state["log_history"] if "num_tokens" in h]
        per_step = [tokens[0], tokens[1] - tokens[0]]
        # unpacked, a batch of two ~12-token documents holds < 32 tokens; packed, full 64-token sequences
        # (one may be the shorter tail of the packed stream)
        assert max(per_step) == 2 * 64 and min(per_step) > 64, (variant, per_step)


def test_pipeline_distils_both_methods_from_the_dense_model(tiny_dense, tmp_path):
    """train.distill_weight=1: SPP and LoRA* both minimise KL(dense ‖ student) instead of the LM loss."""
    args = ["run", "--set", f"model={tiny_dense}", "--set", f"output_dir={tmp_path}", "--set", "name=kd", "--skip", "eval"]
    for item in FAST + ["train.max_steps=2", "train.distill_weight=1.0"]:
        args += ["--set", item]
    assert cli_main(args) == 0
    first = {v: json.loads((tmp_path / "kd" / v / "train" / "loss_history.json").read_text())[0][1] for v in ("spp", "lora_star")}
    # Both start as the pruned base (β = 0, LoRA B = 0) on the same first batch: the same KL to the dense
    # model, which for these near-uniform random models is far below the LM loss (~ln 49152 = 10.8).
    assert first["spp"] == pytest.approx(first["lora_star"], rel=1e-4)
    assert 0.0 < first["spp"] < 1.0
    assert "distilled from the dense model" in (tmp_path / "kd" / "report.md").read_text()


def test_config_overrides_and_errors(tmp_path):
    cfg = PipelineConfig.from_dict(apply_overrides({}, ["train.max_steps=7", "prune.sparsity=0.5", "name=x"]))
    assert cfg.train.max_steps == 7 and cfg.prune.sparsity == 0.5 and cfg.run_dir.name == "x"
    with pytest.raises(ValueError, match="train.max_stepz"):
        PipelineConfig.from_dict({"train": {"max_stepz": 1}})
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.max_steps"])
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ntrain:\n  r: 8\n")
    assert PipelineConfig.from_yaml(path, ["train.scale=4"]).train.r == 8
    lr = PipelineConfig.from_dict(apply_overrides({}, ["train.learning_rate=2e-2", "train.scale=4"])).train
    assert lr.learning_rate == 0.02 and isinstance(lr.learning_rate, float) and lr.scale == 4.0
    nm = PipelineConfig.from_dict(apply_overrides({}, ["prune.sparsity=2:8", "train.max_steps=5"]))
    assert nm.prune.sparsity == "2:8" and nm.train.max_steps == 5  # not YAML 1.1's base-60 number 128
    path.write_text("prune:\n  sparsity: 2:4\n  nsamples: 8\ntrain:\n  learning_rate: 1.5e-2\n")
    from_file = PipelineConfig.from_yaml(path)
    assert from_file.prune.sparsity == "2:4" and from_file.prune.nsamples == 8 and from_file.train.learning_rate == 0.015
    with pytest.raises(ValueError, match="train.learning_rate must be a number"):
        PipelineConfig.from_dict({"train": {"learning_rate": "fast"}})


def test_gap_closed_formula():
    assert gap_closed(100.0, 10.0, 10.0) == pytest.approx(1.0)
    assert gap_closed(100.0, 100.0, 10.0) == pytest.approx(0.0)
    assert gap_closed(100.0, math.sqrt(1000.0), 10.0) == pytest.approx(0.5)


def test_shipped_pipeline_configs_parse():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "smollm2_wanda24_recovery.yaml"
    cfg = PipelineConfig.from_yaml(path)
    assert cfg.prune.sparsity == "2:4" and cfg.train.max_steps > PipelineConfig().train.max_steps
    from spp_hf.alpaca import load_sft_data

    rows, packed = load_sft_data(cfg.train.data)  # its training data ships with the package
    assert len(rows) > 0 and packed == (cfg.train.data == "c4-sample")
