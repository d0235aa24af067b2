"""Adapter kinds: the common contract every kind meets through the generic paths, and a third kind added from
this file alone (a per-row gain, W' = W ⊙ (1 + s·g)) that runs inject, a train step, save, load, merge, card
and push without a line of spp-hf knowing it."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import pruned, zero_masks
from fixtures_hub import TOKEN, hub  # noqa: F401 - the fixture
from huggingface_hub import ModelCard

from spp_hf import MaskedLoRAConfig, SPPConfig, SPPModel, get_spp_model
from spp_hf.adapters import kinds
from spp_hf.adapters.config import AdapterConfig
from spp_hf.adapters.kinds import AdapterKind, register_adapter_kind
from spp_hf.hub.transfer import describe_folder, push_adapter_folder, push_folder
from spp_hf.sparsity import sparsity_report
from spp_hf.sparsity import model_sparsity_record
from spp_hf.storage import write_model_folder

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@dataclass
class GainConfig(AdapterConfig):
    """A toy kind: one trainable gain per output row, Y = X Wᵀ + s·X (W ⊙ g)ᵀ, merged W ⊙ (1 + s·g)."""

    method: ClassVar[str] = "toy_gain"
    _field_types: ClassVar[dict] = {"scale": ((int, float), "a number")}
    scale: float = 0.5


def _forward(layer: Any, name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return layer.base_layer(x, *args, **kwargs) + layer.gain_scale[name] * F.linear(x, layer.weight * layer.toy_g[name])


TOY_KIND = AdapterKind(
    name="toy_gain", label="Toy-Gain", config_class=GainConfig, param_names=("toy_g",), setting_names=("gain_scale",),
    settings=lambda c: {"gain_scale": c.scale}, validate=lambda i, o, c, n: None,
    init=lambda layer, c, device: {"toy_g": torch.zeros(layer.out_features, 1, device=device)},
    trainable=lambda s: ("toy_g",), forward=_forward,
    merged_weight=lambda layer, name, w: w * (1 + layer.gain_scale[name] * layer.toy_g[name].to(w.dtype)),
    parameter_count=lambda c, out_features, in_features: out_features,
    card_settings=lambda c: [("gain scale", f"{c.scale:g}")],
    adapter_description="A **toy gain adapter** for {base_link}: one gain per row of {num_layers} layers ({adapter_params} parameters).",
    merged_description="{base_link} with a toy gain merged; zeros kept ({sparsity_summary}).",
)  # fmt: skip


@pytest.fixture
def toy_kind():
    register_adapter_kind(TOY_KIND)
    try:
        yield TOY_KIND
    finally:
        kinds.KINDS.pop(TOY_KIND.name)


def train_step(model: torch.nn.Module, lr: float = 5e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the kind made nothing trainable"
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for seed in range(2):
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


CONFIGS = {
    "spp": lambda: SPPConfig(r=4, target_modules="all-linear"),
    "masked_lora": lambda: MaskedLoRAConfig(r=4, target_modules="all-linear"),
    "toy_gain": lambda: GainConfig(target_modules="all-linear"),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_kind_meets_the_common_contract(method, tmp_path, request):
    """Starts as the base; trains; saves and reloads to the same outputs; merges to the base's zeros, bit for bit."""
    if method == "toy_gain":
        request.getfixturevalue("toy_kind")
    base = pruned()
    reference = base(IDS).logits
    masks = zero_masks(base)
    model = get_spp_model(copy.deepcopy(base), CONFIGS[method]())
    assert model.active_spp_config.method == method
    torch.testing.assert_close(model(IDS).logits, reference)  # a fresh adapter leaves the base's function
    before = {k: v.detach().clone() for k, v in model.spp_state_dict().items()}
    train_step(model)
    assert any(not torch.equal(before[k], v) for k, v in model.spp_state_dict().items()), "training changed nothing"
    trained = model(IDS).logits
    assert not torch.allclose(trained, reference)

    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "spp_config.json").read_text())["method"] == method
    unmerged = SPPModel.from_pretrained(str(tmp_path / "adapter"), base_model=copy.deepcopy(base), merge=False)
    torch.testing.assert_close(unmerged(IDS).logits, trained)
    merged = SPPModel.from_pretrained(str(tmp_path / "adapter"), base_model=copy.deepcopy(base))
    torch.testing.assert_close(merged(IDS).logits, trained, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(zero_masks(merged)[name], mask) for name, mask in masks.items())
    kind = kinds.kind_named(method)
    record = model_sparsity_record(merged, kind.merged_model_kind, base_mask_fingerprint=model.active_spp_config.mask_fingerprint)
    assert record["kind"] == kind.merged_model_kind


def test_a_third_kind_from_one_file_runs_every_generic_path(toy_kind, hub, tmp_path, monkeypatch):  # noqa: F811
    """Inject, train, save (with its card), load, merge, describe and push a kind spp-hf has never heard of."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = pruned()
    write_model_folder(base, None, tmp_path / "base", "# base\n", model_sparsity_record(base, "pruned-base"))
    base_sha = push_folder(tmp_path / "base", "user/toy-base", token=TOKEN).oid
    model = get_spp_model(copy.deepcopy(base), GainConfig(target_modules="all-linear"))
    train_step(model)
    expected = model(IDS).logits

    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    card = ModelCard((folder / "README.md").read_text())
    n_layers = len(zero_masks(base))
    out_rows = sum(mask.shape[0] for mask in zero_masks(base).values())
    assert card.data.library_name == "spp-hf" and "Toy-Gain adapter" in card.text
    assert f"one gain per row of {n_layers} layers ({out_rows:,} parameters)" in card.text
    assert "| gain scale | 0.5 |" in card.text
    assert describe_folder(folder) == "Toy-Gain adapter"

    push_adapter_folder(folder, "user/toy-adapter", base="user/toy-base")
    repo = hub.state.repo("user/toy-adapter")
    pushed = json.loads(repo.resolve("main").files["spp_config.json"])
    assert (pushed["method"], pushed["base_model_name_or_path"], pushed["base_model_revision"]) == ("toy_gain", "user/toy-base", base_sha)
    assert repo.resolve("main").message == "Upload Toy-Gain adapter"
    merged = SPPModel.from_pretrained("user/toy-adapter")  # downloads the base, checks its zeros, merges
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(zero_masks(merged)[name], mask) for name, mask in zero_masks(base).items())
    assert sparsity_report(merged).zeros == sparsity_report(base).zeros


def test_the_registry_refuses_a_second_kind_of_the_same_name_or_parameters(toy_kind):
    from dataclasses import replace

    @dataclass
    class OtherGain(AdapterConfig):
        method: ClassVar[str] = "other_gain"

    with pytest.raises(ValueError, match="with the name of 'toy_gain' is already registered"):
        register_adapter_kind(TOY_KIND)
    with pytest.raises(ValueError, match="GainConfig.method must be 'toy_gain_2'"):  # a class names one kind
        register_adapter_kind(replace(TOY_KIND, name="toy_gain_2"))
    with pytest.raises(ValueError, match="parameter name"):
        register_adapter_kind(replace(TOY_KIND, name="other_gain", config_class=OtherGain))
    assert sorted(kinds.KINDS) == ["masked_lora", "spp", "toy_gain"]
