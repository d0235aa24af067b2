"""`spp-hf run` end to end on a fast configuration: a tiny Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_tiny_model, prune_magnitude_nm_, zero_masks
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from spp_hf import SPPConfig, SPPModel
from spp_hf.cli import main as cli_main
from spp_hf.data.corpora import C4_SAMPLE_FILE, WIKI_TRAIN_FILE, WIKI_VALIDATION_FILE, documents, read_jsonl
from spp_hf.data.training_data import load_sft_data
from spp_hf.pipeline import evaluation
from spp_hf.pipeline.builtin_methods import adapter_method
from spp_hf.pipeline.config import PipelineConfig, apply_overrides, check_data_separation
from spp_hf.pipeline.methods import METHODS, Method, Prepared, get_method, register
from spp_hf.pipeline.report import write_report
from spp_hf.pipeline.results import EvalRecord, gap_closed
from spp_hf.pipeline.run import run_pipeline
from spp_hf.pipeline.stages import save_merged, stage_eval
from spp_hf.sparsity import model_fingerprint
from spp_hf.pipeline.variants import Variant, variant_config, variants
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
    "eval.heldout_windows=2", "eval.tasks=spp_copa", "eval.limit=4",
]  # fmt: skip
EVERY_METHOD = ["methods=[spp, lora_star, masked_lora, masked_full]", "method_seeds={spp: [0, 1]}", "train.weight_decay=0.1"]  # AdamW decays every weight
VARIANTS = ("spp_s0", "spp_s1", "lora_star_s0", "masked_lora_s0", "masked_full_s0")


def _run(tiny_dense, tmp_path, name: str, items: list[str], skip: str = "") -> Path:
    """`spp-hf run --set model=<tiny> --set ... [--skip ...]`, through the pipeline's own entry point."""
    overrides = [f"model={tiny_dense}", f"output_dir={tmp_path}", f"name={name}", *items]
    return run_pipeline(PipelineConfig.from_dict(apply_overrides({}, overrides)), {s for s in skip.split(",") if s})


@pytest.mark.slow
def test_pipeline_compares_every_method_resumes_and_keeps_zeros(tiny_dense, tmp_path):
    _run(tiny_dense, tmp_path, "fast", FAST + EVERY_METHOD)
    run = tmp_path / "fast"
    for part in ("pruned/sparsity.json", "data/c4-sample.jsonl", "spp_s0/adapter/spp_adapter.safetensors", "eval/spp_s1.json",
                 "report.md", "loss.png", "perplexity.png", "sparsity.png", "gap_vs_cost.png"):  # fmt: skip
        assert (run / part).exists(), part
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned")
    base_w = dict(iter_linear_weights(pruned))
    for variant in VARIANTS:  # plain transformers loads every merged model, with exactly the base's zeros
        merged = AutoModelForCausalLM.from_pretrained(run / variant / "merged")
        changed = False
        for name, w in iter_linear_weights(merged):
            assert torch.equal(w == 0, base_w[name] == 0), (variant, name)
            changed |= not torch.equal(w, base_w[name])
        assert changed, f"{variant} did not train"  # the weights moved, only not at the zeros
        record = json.loads((run / variant / "merged" / "sparsity.json").read_text())
        assert record["kind"] == ("spp-merged" if variant.startswith("spp") else "merged") and record["method"] in variant
        assert record["mask_fingerprint"] == record["base_mask_fingerprint"]
        assert any((w == 0).float().mean() > 0.49 for _, w in iter_linear_weights(merged))
    results = {v: json.loads((run / "eval" / f"{v}.json").read_text()) for v in ("dense", "pruned") + VARIANTS}
    for name, r in results.items():  # the record `spp-hf eval --out` writes
        assert r["variant"] == name and r["kind"] == "checkpoint" and r["model"] and "sparsity" in r
        assert EvalRecord.from_dict(r).to_dict() == r
        assert list(r["perplexity"]) == ["wikitext2", "wiki-validation", "c4-heldout"]
        assert all(math.isfinite(p["ppl"]) and p["windows"] == 2 and p["seqlen"] == 128 for p in r["perplexity"].values())
    assert results["pruned"]["sparsity_pattern"] == "2:4"
    copa = results["spp_s0"]["zero_shot"]["spp_copa"]
    assert 0.0 <= copa["acc"] <= 1.0 and copa["acc_stderr"] > 0 and copa["n"] == 4

    metrics = {v: json.loads((run / v / "train" / "metrics.json").read_text()) for v in VARIANTS}
    assert [metrics[v]["seed"] for v in VARIANTS] == [0, 1, 0, 0, 0]
    assert all(m["train_seconds"] > 0 and m["steps"] == 4 and m["peak_memory_bytes"] > 0 for m in metrics.values())
    assert all(m["epochs"] == pytest.approx(4 * 2 / 16) for m in metrics.values())  # 8 of the 16 Alpaca rows
    targets = [w for n, w in iter_linear_weights(pruned) if n.rsplit(".", 1)[-1] in PipelineConfig().train.target_modules]
    assert metrics["masked_full_s0"]["trainable_parameters"] == sum(int((w != 0).sum()) for w in targets)
    spp_params = sum(w.shape[0] * 16 + w.shape[1] for w in targets)  # α: (out, r), β: (1, in) per targeted layer
    assert metrics["spp_s0"]["trainable_parameters"] == spp_params
    assert metrics["lora_star_s0"]["trainable_parameters"] == sum(8 * (w.shape[0] + w.shape[1]) for w in targets)
    assert metrics["masked_lora_s0"]["trainable_parameters"] == metrics["lora_star_s0"]["trainable_parameters"]
    # seeds change the run: the two SPP seeds start from different α and see the data in another order
    seed_losses = [json.loads((run / v / "train" / "loss_history.json").read_text()) for v in ("spp_s0", "spp_s1")]
    assert [s for s, _ in seed_losses[0]] == [1, 2, 3, 4] and seed_losses[0] != seed_losses[1]

    report = (run / "report.md").read_text()
    for text in ("| model | WikiText-2 ppl | gap | Wikipedia val. ppl | gap | C4 held-out ppl | gap | spp_copa acc |",
                 "SPP s1", "LoRA* s0", "masked LoRA s0", "masked full FT s0", "## Across seeds", "| spp | 2 |", "| masked_full | 1 |", "gap_vs_cost.png",
                 "language-modelling loss", "± ", "of `bundled` (0.5 epochs)"):  # fmt: skip
        assert text in report, text
    assert report.count("identical to the pruned base") == 5 and "DIFFER" not in report

    # a second run, through `spp-hf run`, skips every finished stage: nothing is retrained or re-evaluated
    stamp = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    args = ["run", "--set", f"model={tiny_dense}", "--set", f"output_dir={tmp_path}", "--set", "name=fast"]
    assert cli_main(args + [a for item in FAST + EVERY_METHOD for a in ("--set", item)]) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}

    # the report reads the zeros back from the saved files: a merged model altered on disk is called out
    file = next((run / "lora_star_s0" / "merged").glob("*.safetensors"))
    tensors = load_file(file)
    key = next(k for k in tensors if k.endswith("down_proj.weight"))
    tensors[key][tensors[key] == 0] = 1e-3
    save_file(tensors, file, metadata={"format": "pt"})
    _run(tiny_dense, tmp_path, "fast", FAST + EVERY_METHOD)
    report = (run / "report.md").read_text()
    assert report.count("identical to the pruned base") == 4 and "LoRA* s0: zero masks DIFFER from the pruned base's in 1 layers" in report


def test_a_merged_model_without_the_base_zeros_is_not_saved(tmp_path):
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    reference = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :4] = 0.5  # a merge that filled four zeros (or made new ones)
    prepared = Prepared(trainer=None, trainable_parameters=0, merge=lambda: model, card=lambda m: "card")
    with pytest.raises(RuntimeError, match="spp_s0: .*model.layers.1.mlp.up_proj: zero mask differs"):
        save_merged(model, None, tmp_path / "merged", prepared, reference, Variant("spp_s0", "spp", "spp", 0), "wiki-pretrain")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_pipeline_trains_on_packed_plain_text_at_most_once(tiny_dense, tmp_path):
    """Plain-text rows (train.data=<jsonl of {"text"}>) are packed into full max_length sequences, and a run
    whose steps would pass over them more than train.max_epochs times stops before training."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Short document number {i} about pruning."}) for i in range(200)))
    items = FAST + [f"train.data={docs}", "train.max_steps=2", "train.max_samples=null"]
    _run(tiny_dense, tmp_path, "text", items, skip="eval")
    for variant in ("spp_s0", "lora_star_s0"):
        state = json.loads(next((tmp_path / "text" / variant / "train").glob("checkpoint-*/trainer_state.json")).read_text())
        tokens = [h["num_tokens"] for h in state["log_history"] if "num_tokens" in h]
        per_step = [tokens[0], tokens[1] - tokens[0]]
        # unpacked, a batch of two ~12-token documents holds < 32 tokens; packed, full 64-token sequences
        # (one may be the shorter tail of the packed stream)
        assert max(per_step) == 2 * 64 and min(per_step) > 64, (variant, per_step)
    # ~2400 tokens pack into ~37 rows of 64 tokens: 30 steps × 2 rows would repeat them
    items = FAST + [f"train.data={docs}", "train.max_steps=30", "train.max_samples=null", "methods=[spp]"]
    with pytest.raises(ValueError, match="lower train.max_steps to at most"):
        _run(tiny_dense, tmp_path, "repeat", items, skip="eval")
    assert not list((tmp_path / "repeat" / "spp_s0" / "train").glob("checkpoint-*"))  # nothing trained


@pytest.mark.slow
def test_pipeline_distils_every_method_from_the_dense_model(tiny_dense, tmp_path):
    """train.distill_weight=1: SPP, LoRA* and masked full FT all minimise KL(dense ‖ student) instead of the LM loss."""
    items = FAST + ["train.max_steps=2", "train.distill_weight=1.0", "methods=[spp, lora_star, masked_full]"]
    _run(tiny_dense, tmp_path, "kd", items, skip="eval")
    variants = ("spp_s0", "lora_star_s0", "masked_full_s0")
    first = {v: json.loads((tmp_path / "kd" / v / "train" / "loss_history.json").read_text())[0][1] for v in variants}
    # All start as the pruned base (β = 0, LoRA B = 0, untouched weights) on the same first batch: the same KL
    # to the dense model, which for these near-uniform random models is far below the LM loss (~ln 49152 = 10.8).
    assert first["spp_s0"] == pytest.approx(first["lora_star_s0"], rel=1e-4)
    assert first["spp_s0"] == pytest.approx(first["masked_full_s0"], rel=1e-4)
    assert 0.0 < first["spp_s0"] < 1.0
    assert "distilled from the dense model" in (tmp_path / "kd" / "report.md").read_text()


def test_report_names_the_loss_of_a_variant_that_distils():
    """The report's settings line gave the run's loss for every method, though `spp_kd05` distils: each variant whose
    `set:` changes the loss is named with its own."""
    from spp_hf.pipeline.report import _settings

    folder = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    cfg = PipelineConfig.from_yaml(folder / RECOVERY[0], ["methods=[spp, spp_kd05, spp_kd05_feat1]", "seeds=[0]"])
    runs = variants(cfg)
    line = _settings(cfg, runs, {v.name: {} for v in runs}, 60.0)[2]
    assert "tokens of `wiki-pretrain`, language-modelling loss; spp_kd05: loss 0.5·LM + 0.5·KL to the dense model; " in line
    assert "spp_kd05_feat1: loss 0.5·LM + 0.5·KL to the dense model + 1·feature loss" in line
    assert "spp:" not in line  # SPP trains with the run's loss


def test_pipeline_adds_the_feature_loss_for_every_method(tiny_dense, tmp_path):
    """train.distill_feature_weight: the KL plus the normalised hidden-state MSE, for SPP and masked LoRA alike;
    every merged model keeps the pruned base's zeros."""
    items = FAST + ["train.max_steps=2", "train.distill_weight=1.0", "train.distill_feature_weight=1.0", "methods=[spp, masked_lora]"]
    _run(tiny_dense, tmp_path, "feat", items, skip="eval")
    first = {v: json.loads((tmp_path / "feat" / v / "train" / "loss_history.json").read_text())[0][1] for v in ("spp_s0", "masked_lora_s0")}
    assert first["spp_s0"] == pytest.approx(first["masked_lora_s0"], rel=1e-4)  # both start as the pruned base
    assert "feature loss" in (tmp_path / "feat" / "report.md").read_text()
    pruned_zeros = zero_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "feat" / "pruned"))
    for variant in ("spp_s0", "masked_lora_s0"):
        merged = zero_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "feat" / variant / "merged"))
        assert all(torch.equal(merged[name], mask) for name, mask in pruned_zeros.items())


def test_peft_methods_hira_ia3_and_masked_lokr_keep_the_zeros(tiny_dense, tmp_path):
    """PEFT's HiRA, IA³ and LoKr through `get_sparse_peft_model` in the comparison, with the KL loss too: each
    trains (its trainable count is its own), merges with the checked merge and keeps every zero bit for bit."""
    items = FAST + ["train.max_steps=2", "train.distill_weight=0.5", "methods=[hira, ia3, masked_lokr]"]
    report = _run(tiny_dense, tmp_path, "peft", items, skip="eval").read_text()
    pruned_zeros = zero_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "pruned"))
    trainable = {}
    for variant in ("hira_s0", "ia3_s0", "masked_lokr_s0"):
        merged = zero_masks(AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / variant / "merged"))
        assert all(torch.equal(merged[name], mask) for name, mask in pruned_zeros.items()), variant
        trainable[variant] = json.loads((tmp_path / "peft" / variant / "train" / "metrics.json").read_text())["trainable_parameters"]
    assert len(set(trainable.values())) == 3 and trainable["ia3_s0"] < trainable["hira_s0"]
    assert "HiRA" in report and "IA³" in report and "masked LoKr" in report
    card = (tmp_path / "peft" / "hira_s0" / "merged" / "README.md").read_text()
    assert "HiRA" in card and "LoRA*" not in card
    # each run keeps its adapter, keyed to the pruned base: loaded and merged it gives the saved merged model
    for variant in ("hira_s0", "masked_lokr_s0"):
        folder = tmp_path / "peft" / variant
        reloaded = SPPModel.from_pretrained(folder / "adapter").state_dict()
        saved = AutoModelForCausalLM.from_pretrained(folder / "merged").state_dict()
        assert reloaded.keys() == saved.keys() and all(torch.equal(reloaded[k], saved[k]) for k in saved), variant


@pytest.mark.slow
def test_a_tuning_run_never_evaluates_wikitext2_test(tiny_dense, tmp_path, monkeypatch):
    """eval.ppl_windows=0: learning-rate probes are scored on the validation split and never touch WikiText-2 test."""
    def refuse(*args, **kwargs):
        raise AssertionError("WikiText-2 test was evaluated")

    monkeypatch.setattr(evaluation, "_load_wikitext2", refuse)
    items = FAST + ["train.max_steps=2", "methods=[spp]", "eval.ppl_windows=0", "eval.heldout=wiki-validation", "eval.tasks=none"]
    report = _run(tiny_dense, tmp_path, "probe", items).read_text()
    records = {v: json.loads((tmp_path / "probe" / "eval" / f"{v}.json").read_text()) for v in ("dense", "pruned", "spp_s0")}
    assert all(list(r["perplexity"]) == ["wiki-validation"] and math.isfinite(r["perplexity"]["wiki-validation"]["ppl"])
               for r in records.values())  # fmt: skip
    assert "WikiText-2 test not evaluated" in report and "| Wikipedia val. ppl | gap |" in report
    assert "WikiText-2 ppl" not in report


def test_an_old_run_folder_s_evaluation_records_still_read(tmp_path):
    """eval/<name>.json as the pipeline wrote it before `spp-hf eval` and the pipeline shared one schema: a resumed
    run reads it (nothing is re-evaluated or rewritten) and reports it."""
    cfg = PipelineConfig.from_dict(apply_overrides({}, [f"output_dir={tmp_path}", "name=old", "methods=[spp]"]))
    layout = cfg.layout
    layout.eval.mkdir(parents=True)
    for name, (wiki, held) in {"dense": (20.0, 18.0), "pruned": (80.0, 60.0), "spp_s0": (40.0, 30.0)}.items():
        record = {
            "variant": name, "path": f"/elsewhere/{name}", "ppl_seqlen": 1024, "ppl": wiki, "nll": math.log(wiki), "ppl_windows": 8,
            "heldout": {"wiki-validation": {"ppl": held, "nll": math.log(held), "windows": 4, "seqlen": 1024}},
            "zero_shot": {"spp_copa": {"acc": 0.5, "acc_stderr": 0.1, "n": 20, "num_fewshot": 0}},
        }  # fmt: skip
        layout.eval_record(name).write_text(json.dumps(record))
    before = {p: p.read_bytes() for p in layout.eval.iterdir()}
    results = stage_eval(cfg, {name: tmp_path / "never-loaded" for name in ("dense", "pruned", "spp_s0")})
    assert {p: p.read_bytes() for p in layout.eval.iterdir()} == before
    assert results["spp_s0"].perplexities() == {"wikitext2": 40.0, "wiki-validation": 30.0}
    assert results["spp_s0"].model == "/elsewhere/spp_s0" and results["spp_s0"].zero_shot["spp_copa"]["acc"] == 0.5
    report = write_report(cfg, variants(cfg), results, 60.0).read_text()
    assert "| SPP s0 | 40.00 | 50.0% | 30.00 | 57.6% | 0.500 ± 0.100 |" in report
    assert "windows of 1024 tokens; WikiText-2 raw test 8 windows" in report and "Wikipedia val. 4 windows" in report


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


RECOVERY = ("smollm2_wanda24_recovery.yaml", "smollm2_wanda75_recovery.yaml", "smollm2_sparsegpt24_recovery.yaml", "smollm2_best24.yaml")


@pytest.mark.parametrize("config", RECOVERY)
def test_shipped_recovery_configs_train_once_on_shipped_text(config, smollm2_dir):
    cfg = PipelineConfig.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / "configs" / config)
    runs = variants(cfg)
    assert "spp" in {v.method for v in runs}
    check_data_separation(cfg)
    rows, packed = load_sft_data(cfg.train.data)  # its training text ships with the package
    assert packed and cfg.train.max_epochs <= 1.0
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tokens = sum(len(ids) + 1 for ids in tok(list(rows["text"])).input_ids)  # + the EOS TRL appends to each document
    assert cfg.train.max_steps * cfg.train.batch_size * cfg.train.max_length <= tokens  # one pass at most
    assert cfg.eval.limit is None and "c4-heldout" in cfg.eval.heldout and "wiki-validation" in cfg.eval.heldout


def test_recovery_configs_compare_the_issue_s_methods():
    folder = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    two_four = PipelineConfig.from_yaml(folder / RECOVERY[0])
    names = [v.name for v in variants(two_four)]
    assert names == [
        "spp_s0", "spp_s1", "lora_star_lr6e3_s0", "lora_star_lr6e3_s1", "masked_lora_s0", "masked_lora_s1", "masked_full_lr1e3_s0",
        "hira_s0", "hira_s1", "ia3_s0", "masked_lokr_s0", "spp_kd05_s0", "spp_kd05_s1", "hira_kd05_s0", "masked_lora_kd05_s0",
        "spp_kd05_feat1_s0",
    ]  # fmt: skip
    assert [v.method for v in variants(two_four)][:7] == ["spp", "spp", "lora_star", "lora_star", "masked_lora", "masked_lora", "masked_full"]
    distilled = {v.name: variant_config(two_four, v.overrides, v.seed).train for v in variants(two_four) if "kd05" in v.name}
    assert all(t.distill_weight == 0.5 for t in distilled.values()) and distilled["spp_kd05_feat1_s0"].distill_feature_weight == 1.0
    assert two_four.prune.sparsity == "2:4"
    dropout = variants(PipelineConfig.from_yaml(folder / RECOVERY[0], ["methods=[spp_dropout05]"]))
    assert [v.name for v in dropout] == ["spp_dropout05_s0", "spp_dropout05_s1"] and dropout[0].method == "spp"
    seventy_five = PipelineConfig.from_yaml(folder / RECOVERY[1])
    assert seventy_five.prune.sparsity == 0.75 and [v.name for v in variants(seventy_five)] == [
        "spp_s0", "spp_s1", "spp_s2", "lora_star_s0", "lora_star_s1", "masked_lora_s0", "hira_s0", "hira_s1", "hira_s2", "ia3_s0",
        "spp_kd05_s0",
    ]  # fmt: skip


def test_learning_rate_sweep_probes_the_comparison_on_validation_only():
    """The shipped sweep trains like the 2:4 comparison (fewer steps), brackets each method's rate, and never sees a test text."""
    folder = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    sweep, comparison = (PipelineConfig.from_yaml(folder / n) for n in ("smollm2_wanda24_lr_sweep.yaml", RECOVERY[0]))
    assert sweep.prune == comparison.prune and sweep.lora.r == comparison.lora.r
    skip = {"max_steps", "learning_rate"}
    assert {k: v for k, v in vars(sweep.train).items() if k not in skip} == {k: v for k, v in vars(comparison.train).items() if k not in skip}
    assert sweep.eval.ppl_windows == 0 and sweep.eval.heldout == "wiki-validation" and sweep.eval.tasks == "none"
    check_data_separation(sweep)
    rates: dict[str, list[float]] = {}
    for v in variants(sweep):
        rates.setdefault(v.method, []).append(get_method(v.method).learning_rate(variant_config(sweep, v.overrides, 0)))
    for method, found in rates.items():
        rate = get_method(method).learning_rate(comparison)
        assert rate in found and min(found) < rate < max(found), (method, rate, found)  # the comparison's rate, bracketed


def test_every_comparison_rate_was_probed_on_validation():
    """Each rate the 2:4 comparison trains at (its methods, their first rates, every variant) is one the validation sweep probed."""
    folder = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    sweep = PipelineConfig.from_yaml(folder / "smollm2_wanda24_lr_sweep.yaml")
    probed = {(v.method, get_method(v.method).learning_rate(variant_config(sweep, v.overrides, 0))) for v in variants(sweep)}
    comparison = PipelineConfig.from_yaml(folder / RECOVERY[0])
    entries = dict.fromkeys([*comparison.methods, *comparison.variants, "lora_star", "masked_lora", "masked_full"])
    everything = PipelineConfig.from_yaml(folder / RECOVERY[0], [f"methods=[{', '.join(entries)}]"])
    trained = {(v.method, get_method(v.method).learning_rate(variant_config(everything, v.overrides, 0))) for v in variants(everything)}
    assert {"lora_star_lr6e3", "masked_lora_lr6e3", "masked_full_lr1e3"} <= set(comparison.variants)
    assert trained <= probed, sorted(trained - probed)


def test_best_recipe_settings_were_probed_on_validation_only():
    """Every variant of the best recipe's sweep is valid, scores the Wikipedia validation split alone, and the
    recipe's pruner, rank, rate and loss are ones the sweep probed (its calibration text included)."""
    folder = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    sweep, best = (PipelineConfig.from_yaml(folder / n) for n in ("smollm2_sparsegpt24_sweep.yaml", RECOVERY[3]))
    every = PipelineConfig.from_yaml(folder / "smollm2_sparsegpt24_sweep.yaml", [f"methods=[{', '.join(sweep.variants)}]"])
    assert sweep.eval.ppl_windows == 0 and sweep.eval.heldout == "wiki-validation" and sweep.eval.tasks == "none"
    check_data_separation(sweep)
    assert sweep.prune.method == best.prune.method and sweep.prune.sparsity == best.prune.sparsity
    assert best.prune.calibration in {"c4-sample", "wiki-pretrain"}  # the two calibration texts probed
    probed = {(t.r, t.learning_rate, t.distill_weight, t.max_length) for t in (variant_config(every, v.overrides, 0).train for v in variants(every))}
    (run,) = variants(best)
    t = variant_config(best, run.overrides, 0).train
    assert (t.r, t.learning_rate, t.distill_weight, t.max_length) in probed
    assert all(out % t.r == 0 for out in (576, 192, 1536))  # SmolLM2-135M's q/o, k/v and MLP widths


def test_variants_expand_methods_seeds_and_settings():
    cfg = PipelineConfig.from_dict(apply_overrides({}, [
        "methods=[spp, lora_star, drop]", "seeds=[3, 4]", "method_seeds={lora_star: [7]}",
        "variants={drop: {method: spp, set: [train.dropout=0.05, train.r=4]}}",
    ]))  # fmt: skip
    runs = variants(cfg)
    assert [(v.name, v.method, v.seed) for v in runs] == [
        ("spp_s3", "spp", 3), ("spp_s4", "spp", 4), ("lora_star_s7", "lora_star", 7), ("drop_s3", "spp", 3), ("drop_s4", "spp", 4)
    ]  # fmt: skip
    drop = variant_config(cfg, runs[-1].overrides, runs[-1].seed)
    assert drop.train.dropout == 0.05 and drop.train.r == 4 and drop.train.seed == 4 and cfg.train.dropout == 0.0
    assert runs[0].label == "SPP s3" and runs[-1].label == "drop s4"
    for bad, message in (
        (["methods=[sp]"], "Unknown recovery method 'sp'"),
        (["method_seeds={masked_ful: [0]}"], "neither a method"),
        (["methods=[x]", "variants={x: {method: spp, set: [train.dropoutt=0.1]}}"], "train.dropoutt"),
        (["methods=[x]", "variants={x: {sett: []}}"], "needs 'method'"),
    ):
        with pytest.raises(ValueError, match=message):
            variants(PipelineConfig.from_dict(apply_overrides({}, bad)))


def test_heldout_texts_are_disjoint_from_training_and_calibration():
    calibration, heldout = documents("c4-sample"), documents("c4-heldout")
    assert len(calibration) == len(heldout) == 100 and not set(calibration) & set(heldout)
    assert calibration + heldout == [r["text"] for r in read_jsonl(C4_SAMPLE_FILE)]  # a split of the whole sample
    train, validation = read_jsonl(WIKI_TRAIN_FILE), read_jsonl(WIKI_VALIDATION_FILE)
    assert len(train) == 1000 and len(validation) == 396
    assert not {r["id"] for r in train} & {r["id"] for r in validation}
    assert not {r["text"] for r in train} & {r["text"] for r in validation}
    assert not set(documents("wiki-pretrain")) & set(heldout)
    for clash in (["train.data=c4-heldout"], ["prune.calibration=wiki-validation"]):
        with pytest.raises(ValueError, match="also evaluated as held-out"):
            check_data_separation(PipelineConfig.from_dict(apply_overrides({}, clash)))
    check_data_separation(PipelineConfig.from_dict(apply_overrides({}, ["train.data=c4-heldout", "eval.heldout=wiki-validation"])))


def test_a_registered_method_joins_the_comparison(tiny_dense, tmp_path):
    """Adding a method is one register() call: here an SPP adapter of rank 4, trained and merged like SPP
    (the way masked LoRA joins: adapter_method(lambda cfg: <its config>))."""
    make = lambda cfg: SPPConfig(r=4, target_modules=list(cfg.train.target_modules))  # noqa: E731
    register("spp_rank4", Method("SPP r=4", lambda cfg: cfg.train.learning_rate, adapter_method(make)))
    try:
        _run(tiny_dense, tmp_path, "reg", FAST + ["train.max_steps=2", "methods=[spp_rank4]"], skip="eval")
    finally:
        del METHODS["spp_rank4"]
    run = tmp_path / "reg" / "spp_rank4_s0"
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "reg" / "pruned")
    targets = [w for n, w in iter_linear_weights(pruned) if n.rsplit(".", 1)[-1] in PipelineConfig().train.target_modules]
    assert metrics["trainable_parameters"] == sum(w.shape[0] * 4 + w.shape[1] for w in targets)
    assert (run / "adapter" / "spp_adapter.safetensors").exists() and json.loads((run / "merged" / "sparsity.json").read_text())["kind"] == "spp-merged"
    assert "SPP r=4 s0" in (tmp_path / "reg" / "report.md").read_text()
