"""`spp_hf.get_sparse_peft_model`: PEFT adapters whose training and merge keep the pruned base's zeros.

Every expected value here is computed independently of spp_hf/adapters/sparse_peft.py: additive methods from
PEFT's own ``get_delta_weight`` on an unpatched PEFT copy (W + ΔW ⊙ M written into a plain model), HiRA and IA³
from their multiplicative formulas, zeros from `zero_masks` (weight == 0).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import pruned, train_steps, zero_masks
from peft import (
    BOFTConfig,
    FourierFTConfig,
    HiraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    VeraConfig,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from spp_hf import MaskedLoRAConfig, get_sparse_peft_model, get_spp_model
from spp_hf.sparsity import model_fingerprint

ADDITIVE = ("lora", "loha", "lokr", "vera", "fourierft")


def targets(arch: str, method: str) -> list[str]:
    if arch == "gpt2":
        return ["c_attn", "c_proj"] if method == "vera" else ["c_attn", "c_fc"]
    return ["q_proj", "o_proj"] if method == "vera" else ["q_proj", "v_proj", "down_proj"]


def config(method: str, arch: str = "llama", **extra):
    """A small PEFT config of `method` for a tiny model of `arch` (VeRA on equal-shaped targets)."""
    common = dict(target_modules=targets(arch, method), **extra)
    fan = {"fan_in_fan_out": arch == "gpt2"}
    if method == "lora":
        return LoraConfig(r=4, lora_alpha=8, **fan, **common)
    if method == "loha":
        return LoHaConfig(r=4, alpha=8, **common)
    if method == "lokr":
        return LoKrConfig(r=4, alpha=8, **common)
    if method == "vera":
        return VeraConfig(r=8, **fan, **common)
    if method == "fourierft":
        return FourierFTConfig(n_frequency=40, **fan, **common)
    if method == "hira":
        return HiraConfig(r=4, **fan, **common)
    if method == "ia3":
        feedforward = [t for t in common["target_modules"] if t in ("down_proj", "c_fc")]
        return IA3Config(feedforward_modules=feedforward, **fan, **common)
    raise ValueError(method)


def randomize_(model: nn.Module, method: str, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero adapter values (PEFT starts B, or its equivalent, at zero): IA³ around 1, the others around 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen) * std
                param.copy_((1.0 if method == "ia3" else 0.0) + noise.to(param.dtype))


def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name in the transformers model: PEFT tuner layer} of a PeftModel."""
    inner = model.base_model.model
    return {name: module for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)}


def stored_weight(layer: nn.Module) -> torch.Tensor:
    return layer.get_base_layer().weight


def reference_model(base: nn.Module, method: str, cfg, state: dict) -> nn.Module:
    """A plain copy of `base` whose targeted weights hold the expected merged weight, from an unpatched PEFT model
    carrying the adapter values `state`: W + ΔW ⊙ M (additive), W ⊙ (1 + B A) (HiRA), W ⊙ l (IA³)."""
    plain = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    plain.load_state_dict(state)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in tuner_layers(plain).items():
            target = ref.get_submodule(name).weight  # stored layout (Conv1D: in × out)
            w = target.double()
            if method in ADDITIVE:
                delta = layer.get_delta_weight("default").double()
                delta = delta if delta.shape == w.shape else delta.t()
                new = torch.where(w == 0, w, w + delta)
            elif method == "hira":
                prod = (layer.hira_B["default"] @ layer.hira_A["default"]).double()
                new = w * (1 + (prod.t() if isinstance(layer.get_base_layer(), Conv1D) else prod))
            else:
                scale = layer.ia3_l["default"].double()
                new = w * (scale.t() if isinstance(layer.get_base_layer(), Conv1D) else scale)
            target.copy_(new.to(target.dtype))
    return ref


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def assert_same_zeros(model: nn.Module, base: nn.Module) -> None:
    """Every linear layer of `model` (a PeftModel's layers under their transformers names) has `base`'s zeros."""
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    expected, found = zero_masks(base), zero_masks(inner)
    for name, mask in expected.items():
        assert torch.equal(found[name], mask), f"{name}: zeros changed"


CASES = [(m, "llama") for m in (*ADDITIVE, "hira", "ia3")] + [
    ("lora", "mistral"), ("lora", "qwen2"), ("lora", "gpt2"), ("vera", "gpt2"), ("hira", "gpt2"), ("ia3", "gpt2"),
]  # fmt: skip


# --------------------------------------------------------------------------- outputs, training, merge
@pytest.mark.parametrize("method,arch", CASES)
def test_outputs_match_the_formula_and_the_merge_keeps_every_zero(method, arch):
    """Outputs equal the independent formula; after training steps merge_and_unload keeps every zero of the
    base bit for bit, matches the unmerged outputs and the recorded mask fingerprint."""
    base = pruned(arch)
    cfg = config(method, arch)
    model = get_sparse_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    randomize_(model, method)
    model.eval()
    expected = reference_model(base, method, cfg, model.state_dict())(input_ids=ids()).logits
    with torch.no_grad():
        got = model(input_ids=ids()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    losses = train_steps(model, steps=3, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        unmerged = model(input_ids=ids(1)).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids(1)).logits, base(input_ids=ids(1)).logits)
    names = list(tuner_layers(model))
    recorded = model.spp_sparse_peft["mask_fingerprint"]
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert_same_zeros(merged, base)
    assert model_fingerprint(merged, names) == recorded == model_fingerprint(base, names)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids(1)).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_training_updates_live_on_the_non_zeros():
    """After training, the sparse layer's effective update ΔW ⊙ M is exactly zero on W's zeros while PEFT's raw
    delta is not, and the adapters did move."""
    base = pruned("llama")
    model = get_sparse_peft_model(copy.deepcopy(base), config("lora"))
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, steps=3, lr=1e-2)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    for name, layer in tuner_layers(model).items():
        zeros = stored_weight(layer) == 0
        raw = type(layer)._spp_peft_class.get_delta_weight(layer, "default")
        assert (raw[zeros] != 0).any(), name
        assert torch.count_nonzero(layer.get_delta_weight("default")[zeros]) == 0, name


def test_merge_adapter_unmerge_adapter_and_disable_follow_peft():
    """merge_adapter gives the same outputs from the base forward with the base's zeros; unmerge_adapter restores
    them (zeros exact); disable_adapter on a merged model unmerges and runs the base."""
    base = pruned("llama")
    model = get_sparse_peft_model(copy.deepcopy(base), config("lora"))
    randomize_(model, "lora")
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids()).logits
        model.merge_adapter()
        assert all(layer.merged for layer in tuner_layers(model).values())
        assert_same_zeros(model, base)
        torch.testing.assert_close(model(input_ids=ids()).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        assert_same_zeros(model, base)
        torch.testing.assert_close(model(input_ids=ids()).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids()).logits, base(input_ids=ids()).logits, atol=1e-5, rtol=1e-5)
        assert_same_zeros(model, base)


def test_two_adapters_active_and_add_adapter_is_patched():
    """An adapter added later is patched too; with both active the update is (ΔW₁ + ΔW₂) ⊙ M."""
    base = pruned("llama")
    model = get_sparse_peft_model(copy.deepcopy(base), config("lora"))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_(model, "lora")
    model.base_model.set_adapter(["default", "other"])
    model.eval()
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in tuner_layers(model).items():
            assert type(layer).__name__.startswith("Sparse")
            target = ref.get_submodule(name).weight
            delta = sum(type(layer)._spp_peft_class.get_delta_weight(layer, a) for a in ("default", "other"))
            target.copy_(torch.where(target == 0, target, target + delta))
        torch.testing.assert_close(model(input_ids=ids()).logits, ref(input_ids=ids()).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="LoHa"):
        model.add_adapter("dora", LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    assert "dora" not in model.peft_config


# --------------------------------------------------------------------------- gradients
class Holder(nn.Module):
    """One layer as a model, so PEFT can target it by name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def one_layer(in_f: int, out_f: int, conv1d: bool = False, dtype=torch.float64, seed: int = 0) -> Holder:
    """A single pruned (half zeros) Linear or Conv1D layer in a Holder."""
    torch.manual_seed(seed)
    layer = Conv1D(out_f, in_f) if conv1d else nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.normal_()
        layer.weight[torch.rand(layer.weight.shape) < 0.5] = 0
    return Holder(layer.to(dtype))


def single_config(method: str, conv1d: bool = False, **extra):
    fan = {"fan_in_fan_out": conv1d}
    if method == "lora":
        return LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], **fan, **extra)
    if method == "loha":
        return LoHaConfig(r=2, alpha=4, target_modules=["proj"], **extra)
    if method == "lokr":
        return LoKrConfig(r=2, alpha=4, target_modules=["proj"], **extra)
    if method == "vera":
        return VeraConfig(r=4, target_modules=["proj"], **fan, **extra)
    return FourierFTConfig(n_frequency=10, target_modules=["proj"], **fan, **extra)


def dense(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return weight.t() if conv1d else weight


@pytest.mark.parametrize(
    "method,conv1d", [("lora", False), ("lora", True), ("loha", False), ("lokr", False), ("vera", False), ("fourierft", True)]
)
def test_gradients_match_autograd_through_the_formula(method, conv1d):
    """gradcheck in float64 on one layer (x and the adapter parameters), and the same gradients as autograd
    through Y = X (W + ΔW ⊙ M)ᵀ + b with ΔW from PEFT's own get_delta_weight."""
    model = get_sparse_peft_model(one_layer(6, 5, conv1d), single_config(method, conv1d))
    model.to(torch.float64)
    randomize_(model, method, std=0.5)
    layer = model.base_model.model.proj
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    # PEFT's FourierFT computes its inverse FFT in float32, so finite differences need a coarser step there
    tol = dict(eps=1e-3, atol=1e-2, rtol=1e-2) if method == "fourierft" else dict(eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda x, *ps: layer(x), (x, *params), **tol)

    grad = torch.randn(3, 4, 5, dtype=torch.float64)
    got = torch.autograd.grad(layer(x), (x, *params), grad)
    base = layer.get_base_layer()
    w = dense(base.weight, conv1d)
    delta = type(layer)._spp_peft_class.get_delta_weight(layer, "default")
    delta = delta.t() if delta.shape != w.shape else delta
    y = F.linear(x, w + delta * (w != 0), base.bias)
    expected = torch.autograd.grad(y, (x, *params), grad, allow_unused=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e)


def test_input_dropout_is_the_methods_and_backward_reuses_its_mask():
    """LoRA's lora_dropout drops the update's input: with one-hot input rows each output row is the base's or
    the base's plus the full update / (1 - p); the adapter gradients and dX (where X is non-zero) use that same
    draw."""
    p = 0.5
    model = get_sparse_peft_model(one_layer(8, 6), single_config("lora", lora_dropout=p))
    randomize_(model, "lora", std=0.5)
    layer = model.base_model.model.proj
    model.train()
    w = layer.get_base_layer().weight
    bias = layer.get_base_layer().bias
    masked = layer.get_delta_weight("default")
    cols = torch.arange(64) % 8
    x = (torch.nn.functional.one_hot(cols, 8) * torch.linspace(1, 2, 64).unsqueeze(1)).double().requires_grad_()
    torch.manual_seed(3)
    y = layer(x)
    base_out = F.linear(x, w, bias)
    full = base_out + F.linear(x, masked) / (1 - p)
    kept = (y - full).abs().amax(1) < 1e-9
    dropped = (y - base_out).abs().amax(1) < 1e-9
    assert bool((kept | dropped).all()) and kept.any() and dropped.any()

    grad = torch.randn(64, 6, dtype=torch.float64)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    got = torch.autograd.grad(y, (x, *params), grad)
    keep = kept.double().unsqueeze(1)
    delta = type(layer)._spp_peft_class.get_delta_weight(layer, "default")
    y_ref = F.linear(x, w, bias) + F.linear(x * keep / (1 - p), delta * (w != 0))
    expected = torch.autograd.grad(y_ref, (x, *params), grad)
    for g, e in zip(got[1:], expected[1:]):
        torch.testing.assert_close(g, e)
    # dX: where X is non-zero the draw is known (elsewhere it was never observed)
    rows = torch.arange(64)
    torch.testing.assert_close(got[0][rows, cols], expected[0][rows, cols])


def test_lycoris_dropouts_keep_their_peft_semantics():
    """LoHa's module_dropout skips the whole update in training (rate 1: always); its rank_dropout drops output
    rows of ΔW ⊙ M and rescales the kept ones by 1 / mean, and the gradients use that same draw."""
    model = get_sparse_peft_model(one_layer(8, 6), single_config("loha", module_dropout=1.0))
    randomize_(model, "loha", std=0.5)
    layer = model.base_model.model.proj
    base = layer.get_base_layer()
    x = torch.randn(5, 8, dtype=torch.float64)
    model.train()
    torch.testing.assert_close(layer(x), base(x))
    model.eval()
    assert not torch.allclose(layer(x), base(x))

    model = get_sparse_peft_model(one_layer(8, 64), single_config("loha", rank_dropout=0.5))
    randomize_(model, "loha", std=0.5)
    layer = model.base_model.model.proj
    base = layer.get_base_layer()
    masked = layer.get_delta_weight("default")
    model.train()
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.manual_seed(0)
    y = layer(x)
    ratio = (y - base(x)).sum(0) / F.linear(x, masked).sum(0)  # per output row of ΔW: 0 or 1 / mean
    kept = ratio.abs() > 1e-6
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 64 / int(kept.sum())))
    grad = torch.randn(5, 64, dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, params, grad)
    delta = type(layer)._spp_peft_class.get_delta_weight(layer, "default")
    y_ref = base(x) + F.linear(x, delta * (base.weight != 0) * (kept.double() * 64 / int(kept.sum())).unsqueeze(1))
    for g, e in zip(got, torch.autograd.grad(y_ref, params, grad)):
        torch.testing.assert_close(g, e)


def test_nothing_weight_sized_is_saved_for_backward():
    """A 256×512 layer: no tensor autograd saves has out·in elements or more (with and without dropout)."""
    for dropout, method in ((0.0, "lora"), (0.1, "lora"), (0.0, "loha")):
        extra = {"lora_dropout": dropout} if method == "lora" else {}
        model = get_sparse_peft_model(one_layer(512, 256, dtype=torch.float32), single_config(method, **extra))
        randomize_(model, method, std=0.01)
        model.train()
        x = torch.randn(64, 512, requires_grad=True)
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        assert sizes and max(sizes) < 256 * 512, (method, dropout, sizes)
        y.sum().backward()
        assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_outputs_follow_the_base_dtype():
    """A bfloat16 base: outputs in bfloat16 close to the formula, training runs, the merge keeps every zero."""
    base = pruned("llama", dtype=torch.bfloat16)
    cfg = config("lora")
    model = get_sparse_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    randomize_(model, "lora")
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids()).logits
        expected = reference_model(base, "lora", cfg, model.state_dict())(input_ids=ids()).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=5e-2)
    train_steps(model, steps=1, lr=1e-3)
    assert_same_zeros(model.merge_and_unload(), base)


def test_same_as_spp_hf_masked_lora():
    """Masked PEFT LoRA and spp-hf's masked LoRA from the same A and B: same outputs and gradients."""
    base = pruned("llama")
    names = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_sparse_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=names))
    randomize_(peft_model, "lora")
    spp_model = get_spp_model(copy.deepcopy(base), MaskedLoRAConfig(r=4, lora_alpha=8, target_modules=names))
    pairs = []
    with torch.no_grad():
        for name, layer in tuner_layers(peft_model).items():
            spp_layer = spp_model.get_submodule(name)
            spp_layer.lora_A["default"].copy_(layer.lora_A["default"].weight)
            spp_layer.lora_B["default"].copy_(layer.lora_B["default"].weight)
            pairs.append((layer.lora_A["default"].weight, spp_layer.lora_A["default"]))
            pairs.append((layer.lora_B["default"].weight, spp_layer.lora_B["default"]))
    batch = ids()
    out_peft = peft_model(input_ids=batch, labels=batch)
    out_spp = spp_model(input_ids=batch, labels=batch)
    torch.testing.assert_close(out_peft.logits, out_spp.logits, atol=1e-5, rtol=1e-5)
    out_peft.loss.backward()
    out_spp.loss.backward()
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------- the control and the refusals
def test_control_plain_peft_lora_merge_fills_zeros():
    """Without the mask PEFT's LoRA merge fills the zeros: the feature matters."""
    base = pruned("llama")
    model = get_peft_model(copy.deepcopy(base), config("lora"))
    randomize_(model, "lora")
    merged = model.merge_and_unload()
    before, after = zero_masks(base), zero_masks(merged)
    assert any(int(after[name].sum()) < int(before[name].sum()) for name in before)


@pytest.mark.parametrize(
    "cfg",
    [
        OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"]),
        BOFTConfig(boft_block_size=4, target_modules=["q_proj"]),
        LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]),
        LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj"]),
        LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]),
    ],
    ids=["oft", "boft", "dora", "pissa", "embedding-target"],
)
def test_refused_methods_name_the_supported_ones_and_leave_the_model(cfg):
    """OFT, BOFT, DoRA, base-rewriting inits and non-linear targets are refused naming what works; the model
    comes back unwrapped, its weights and trainable flags unchanged."""
    model = pruned("llama")
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="LoRA.*LoHa, LoKr, VeRA.*HiRA and IA³"):
        get_sparse_peft_model(model, cfg)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (value, trains) in before.items():
        assert torch.equal(after[name], value) and after[name].requires_grad == trains, name


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_untouched(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[name]), name


def test_a_merge_with_non_finite_values_is_refused_untouched():
    """An overflowing adapter on the last targeted layer: merge_and_unload and merge_adapter refuse before any
    layer is written, and the model still runs unmerged."""
    model = get_sparse_peft_model(pruned("llama"), config("lora"))
    randomize_(model, "lora")
    name, layer = list(tuner_layers(model).items())[-1]
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(1e30)
        layer.lora_B["default"].weight.fill_(1e30)
    saved = snapshot(model)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match=f"{name}.*non-finite.*Nothing was written"):
            merge()
        assert_untouched(model, saved)
        assert not any(layer.merged for layer in tuner_layers(model).values())
        assert len(tuner_layers(model)) == 6


def test_a_merge_that_zeroes_a_non_zero_is_refused_untouched():
    """LoRA with ΔW[i, j] = -W[i, j] exactly (scaling 1, one-hot A and B) and IA³ with a zero scale: both merges
    would change the mask, so both are refused and nothing is written."""
    model = get_sparse_peft_model(pruned("llama"), LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]))
    layer = tuner_layers(model)["model.layers.1.self_attn.q_proj"]
    w = stored_weight(layer)
    i, j = (w != 0).nonzero()[0].tolist()
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()[0, j] = 1.0
        layer.lora_B["default"].weight.zero_()[i, 0] = -w[i, j]
    saved = snapshot(model)
    with pytest.raises(ValueError, match="turns 1 non-zeros into zeros"):
        model.merge_and_unload()
    assert_untouched(model, saved)

    model = get_sparse_peft_model(pruned("llama"), config("ia3"))
    layer = tuner_layers(model)["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        layer.ia3_l["default"][0, 3] = 0.0
    saved = snapshot(model)
    with pytest.raises(ValueError, match="non-zeros into zeros"):
        model.merge_adapter()
    assert_untouched(model, saved)
