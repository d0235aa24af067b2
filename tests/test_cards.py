"""Model cards of pruned bases, adapters and merged models: Hub metadata, sparsity tables, usage snippets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import pruned
from fixtures_hub import hub  # noqa: F401 - the fixture
from huggingface_hub import ModelCard

from spp_hf import SPPConfig, get_spp_model, sparsity_report
from spp_hf.hub.cards import (
    PLACEHOLDER_REPO_ID,
    render_adapter_card,
    render_baseline_merged_card,
    render_merged_card,
    render_pruned_base_card,
    template_path,
)
from spp_hf.sparsity import iter_linear_weights

REPO_ROOT = Path(__file__).resolve().parent.parent
LM_EVAL_RESULTS = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.625, "acc_stderr,none": 0.02, "acc_norm,none": 0.6}}


@pytest.fixture
def pruned_llama():
    return pruned("llama")


def table_rows(text: str) -> dict[str, list[str]]:
    """Per-layer rows of a card's sparsity table: layer name -> cells."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\| `(model\.layers\.[^`]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def check_sparsity_table(text: str, model: torch.nn.Module) -> None:
    """Every linear layer appears once, with its zero count and ratio counted directly from the weights."""
    rows = table_rows(text)
    weights = dict(iter_linear_weights(model))
    assert rows.keys() == weights.keys()
    for name, weight in weights.items():
        zeros = int((weight == 0).sum())
        assert rows[name][1] == f"{zeros:,}" and float(rows[name][2]) == pytest.approx(zeros / weight.numel(), abs=1e-4)


def test_pruned_base_card(hub, pruned_llama):  # noqa: F811
    report = sparsity_report(pruned_llama).to_dict()
    text = render_pruned_base_card(
        "tiny/dense-llama", "wanda", "2:4", "allenai/c4", report, 41.5,
        repo_id="user/tiny-wanda24", perplexity_dataset="wikitext", license="apache-2.0",
    )  # fmt: skip
    card = ModelCard(text)
    card.validate()  # the local Hub's metadata check
    data = card.data
    assert data.base_model == "tiny/dense-llama" and data.base_model_relation == "quantized"
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.tags == ["spp", "sparse", "pruned", "wanda", "2:4"]
    assert data.datasets == ["allenai/c4"]
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results] == [("wikitext", "perplexity", 41.5)]
    assert 'AutoModelForCausalLM.from_pretrained("user/tiny-wanda24")' in card.text
    assert "| Perplexity after pruning | 41.500 (wikitext) |" in card.text
    check_sparsity_table(card.text, pruned_llama)


def test_adapter_card_from_model_and_from_config(hub, pruned_llama, tmp_path):  # noqa: F811
    base_dir = tmp_path / "base"
    pruned_llama.save_pretrained(base_dir)
    (base_dir / "README.md").write_text("---\nlicense: mit\ntags: [spp, sparse, pruned, sparsegpt, '2:4']\n---\n# base\n")
    pruned_llama.name_or_path = str(base_dir)
    model = get_spp_model(pruned_llama, SPPConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    config = model.active_spp_config
    text = render_adapter_card(
        config, model, dataset_name="yahma/alpaca-cleaned", final_loss=1.2345,
        training_args={"learning_rate": 0.004, "max_steps": 3}, eval_results=LM_EVAL_RESULTS,
    )  # fmt: skip
    card = ModelCard(text)
    card.validate()
    data = card.data
    assert data.base_model is None  # a local folder is not a Hub id, so it is named only in the body
    assert f"`{base_dir}` (a local folder)" in card.text
    assert data.library_name == "spp-hf" and data.license == "mit"  # inherited from the base's card
    assert {"spp", "sparse", "pruned", "sparsegpt", "2:4", "spp-adapter"} == set(data.tags)
    assert data.datasets == ["yahma/alpaca-cleaned"]
    assert sorted((r.metric_type, r.metric_value) for r in data.eval_results) == [("acc", 0.625), ("acc_norm", 0.6)]
    assert f'SPPModel.from_pretrained("{PLACEHOLDER_REPO_ID}")' in card.text
    assert "| Final training loss | 1.2345 |" in card.text and "| learning_rate | `0.004` |" in card.text
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"| Adapter parameters | {trainable:,} |" in card.text
    assert f"| Mask fingerprint | `{config.mask_fingerprint['hash'][:16]}` |" in card.text
    rows = table_rows(card.text)
    assert len(rows) == 6 and all(cells[3] == "2:4" for cells in rows.values())

    from_config = ModelCard(render_adapter_card(config, repo_id="user/x-spp"))
    assert table_rows(from_config.text).keys() == rows.keys()
    assert all(table_rows(from_config.text)[k][1] == rows[k][1] for k in rows)  # zeros from the fingerprint
    assert 'SPPModel.from_pretrained("user/x-spp")' in from_config.text
    assert from_config.data.eval_results is None and "model-index" not in from_config.data.to_dict()


def test_adapter_card_names_a_hub_base(hub, pruned_llama):  # noqa: F811
    model = get_spp_model(pruned_llama, SPPConfig(r=4))
    config = model.active_spp_config
    config.base_model_name_or_path, config.base_model_revision = "user/tiny-wanda24", "a" * 40
    card = ModelCard(render_adapter_card(config, model, dataset_name="/data/alpaca.json"))
    card.validate()
    assert card.data.base_model == "user/tiny-wanda24" and card.data.base_model_relation == "adapter"
    assert card.data.datasets is None and "`/data/alpaca.json`" in card.text  # local data: body only
    assert f"| Base revision | `{'a' * 40}` |" in card.text
    for bundled in ("bundled", "c4-sample"):  # the names of samples shipped with spp-hf are not Hub datasets
        card = ModelCard(render_adapter_card(config, model, dataset_name=bundled))
        assert card.data.datasets is None and f"`{bundled}`" in card.text


def test_merged_card(hub, pruned_llama):  # noqa: F811
    config = SPPConfig(r=8, base_model_name_or_path="user/tiny-wanda24", base_model_revision="b" * 40,
                       mask_fingerprint={"hash": "c" * 64, "modules": {"model.layers.0.self_attn.q_proj":
                                                                       {"shape": [64, 64], "zeros": 2048, "hash": "d" * 64}}})  # fmt: skip
    report = sparsity_report(pruned_llama).to_dict()
    text = render_merged_card(config, report, {"wikitext": {"perplexity": 30.25}}, repo_id="user/tiny-merged",
                              adapter="user/tiny-wanda24-spp")  # fmt: skip
    card = ModelCard(text)
    card.validate()
    data = card.data
    assert data.base_model == "user/tiny-wanda24" and data.base_model_relation == "finetune"
    assert data.library_name == "transformers" and data.tags == ["spp", "sparse", "pruned", "2:4", "spp-merged"]
    assert data.model_name == "user/tiny-merged"
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in data.eval_results] == [("wikitext", "perplexity", 30.25)]
    assert 'AutoModelForCausalLM.from_pretrained("user/tiny-merged")' in card.text
    assert "| r (rows of α) | 8 |" in card.text and "`cccccccccccccccc`" in card.text
    check_sparsity_table(card.text, pruned_llama)


def test_local_hub_rejects_bad_metadata(hub):  # noqa: F811
    """The validator the card tests rely on can fail."""
    with pytest.raises(ValueError, match="license"):
        ModelCard("---\nlicense: my-own-license\n---\n# x\n").validate()
    with pytest.raises(ValueError, match="base_model_relation"):
        ModelCard("---\nbase_model: a/b\nbase_model_relation: pruned\n---\n# x\n").validate()
    with pytest.raises(ValueError, match="model-index"):
        ModelCard("---\nmodel-index:\n- name: x\n  results: []\n---\n# x\n").validate()


@pytest.mark.parametrize("kind", ["pruned_base", "adapter", "merged", "baseline_merged"])
def test_templates_ship_in_the_package(kind):
    packaged = template_path(kind)
    assert packaged.parent.name == "card_templates" and packaged.parent.parent.name == "hub"
    assert packaged.read_text().startswith("---\n{{ card_data }}\n---\n")


@pytest.mark.parametrize(
    ("method", "says", "never"),
    [
        ("masked_full", ["masked full fine-tuning", "every non-zero weight", "gradients and optimizer updates masked"],
         ["LoRA", "re-applied"]),
        ("lora_star", ["LoRA*", "mask re-applied"], ["masked full"]),
        ("LoRA*", ["LoRA*", "mask re-applied"], ["masked full"]),  # the label the pipeline passes
        ("masked_lora", ["masked-LoRA", "(W ≠ 0)"], ["LoRA*", "re-applied"]),
        ("my_method", ["**my_method**"], ["LoRA", "re-applied"]),  # a method registered elsewhere: no claims about it
    ],
)
def test_baseline_merged_card_describes_its_method(hub, pruned_llama, method, says, never):  # noqa: F811
    report = sparsity_report(pruned_llama).to_dict()
    card = ModelCard(render_baseline_merged_card(method, "user/tiny-wanda24", report, repo_id="user/tiny-merged"))
    card.validate()
    assert card.data.base_model == "user/tiny-wanda24" and card.data.base_model_relation == "finetune"
    assert all(text in card.text for text in says), card.text
    assert not [text for text in never if text in card.text], card.text
    assert "| module | layers | zeros | ratio | N:M |" in card.text
