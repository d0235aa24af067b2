"""Masked LoRA as an adapter kind of the SPP machinery (issue 14): the layer against the formula written out
here, Y = X Wᵀ + b + (lora_alpha / r) · Dropout(X) ((B A) ⊙ M)ᵀ with M = (W ≠ 0), on Llama, Mistral, Qwen2 and
GPT-2 (Conv1D); train → save → reload → merge keeping the pruned base's zeros; SPP and masked-LoRA files
never loading as each other; both kinds side by side; the trainer, CLI, Hub push and recipe."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import prune_magnitude_nm_, pruned, train_steps, zero_masks
from fixtures_hub import TOKEN, hub  # noqa: F401 - the fixture
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from spp_hf import MaskedLoRAConfig, SPPConfig, SPPLinear, SPPModel, get_spp_model
from spp_hf.adapters.config import AdapterConfig
from spp_hf.sparsity import iter_linear_weights
from spp_hf.sparsity import model_sparsity_record
from spp_hf.storage import write_model_folder

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def ml_config(arch: str = "llama", **kw) -> MaskedLoRAConfig:
    kw.setdefault("r", 3)  # 3 divides no out_features here: masked LoRA needs no divisibility
    kw.setdefault("lora_alpha", 6.0)
    if arch == "gpt2":
        kw.setdefault("target_modules", GPT2_TARGETS)
    return MaskedLoRAConfig(**kw)


def randomize(model: torch.nn.Module, seed: int = 1, adapter: str | None = None) -> None:
    """Give every adapter tensor random values (B starts at zero, which would hide the update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.spp_layers():
            for p in layer.adapter_parameters(adapter).values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


def dense(base: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weight, written independently of spp_hf: Conv1D stores (in, out)."""
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def reference(x, base, lora_A, lora_B, scale):
    """Y = X Wᵀ + b + s · X ((B A) ⊙ (W ≠ 0))ᵀ (no dropout), the issue's formula in plain PyTorch."""
    w = dense(base)
    update = (lora_B @ lora_A) * (w != 0)
    y = x @ w.t() + scale * x @ update.t()
    return y if base.bias is None else y + base.bias


# --------------------------------------------------------------------------- the formula
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_gradients_and_merge_equal_the_formula(arch):
    model = get_spp_model(pruned(arch, torch.float64), ml_config(arch, adapter_dtype="float64"))
    randomize(model)
    layers = dict(model.spp_layers())
    assert len(layers) == (8 if arch == "gpt2" else 14)
    scale = 6.0 / 3
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name, layer in layers.items():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        assert a.shape == (3, layer.in_features) and b.shape == (layer.out_features, 3)
        assert layer.adapter_settings()["scale"] == scale
        xin = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
        torch.testing.assert_close(layer(xin), reference(xin, layer.base_layer, a, b, scale), rtol=1e-10, atol=1e-10)

    # float64 gradcheck of dX, dA, dB on the first layer (a Conv1D for GPT-2)
    name, layer = next(iter(layers.items()))
    assert isinstance(layer.base_layer, Conv1D) == (arch == "gpt2")

    def f(x, a, b):
        return torch.func.functional_call(layer, {"lora_A.default": a, "lora_B.default": b}, (x,))

    a = layer.lora_A["default"].detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x[:, :3].clone().requires_grad_(True), a, b), eps=1e-6, atol=1e-6, fast_mode=True)

    # and the gradients equal those of the independent formula
    xr = x.clone().requires_grad_(True)
    out = f(xr, a, b)
    grads = torch.autograd.grad(out.square().sum(), (xr, a, b))
    ref = reference(xr, layer.base_layer, a, b, scale)
    ref_grads = torch.autograd.grad(ref.square().sum(), (xr, a, b))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    # merge: W + s·(B A) ⊙ M exactly where W ≠ 0, +0.0 where W = 0; unmerge restores the bits
    before = {n: dense(lay.base_layer).detach().clone() for n, lay in layers.items()}
    model.merge_spp()
    for n, lay in layers.items():
        w = before[n]
        want = torch.where(w != 0, w + scale * (lay.lora_B["default"] @ lay.lora_A["default"]), torch.zeros_like(w))
        merged = dense(lay.base_layer)
        torch.testing.assert_close(merged, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(merged == 0, w == 0) and not torch.signbit(merged[w == 0]).any()
    model.unmerge_spp()
    assert all(torch.equal(dense(lay.base_layer), before[n]) for n, lay in layers.items())


def test_nf4_base_uses_the_quantized_base_gemm_and_the_masked_branch(tmp_path):
    """On a 4-bit base the base GEMM stays quantized and the branch uses the dequantized W's mask; the adapter
    trains and its merge onto the full-precision base keeps that base's zeros."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base_dir = tmp_path / "base"
    pruned().save_pretrained(base_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant), ml_config())
    randomize(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer.base_layer).__name__ == "Linear4bit"
    w = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    x = torch.randn(3, 64)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    model.eval()
    with torch.no_grad():  # eval + no_grad: bitsandbytes repacks the 4-bit weight for its CPU kernel here
        want = layer.base_layer(x) + 2.0 * x @ ((b @ a) * (w != 0)).t()
        for _ in range(2):  # the second call reads the repacked weight (the old dense_weight dequantized garbage)
            torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    train_steps(model, steps=2, ids=IDS)
    assert all(lay.lora_B["default"].grad is None for _, lay in model.spp_layers())  # zeroed by the optimizer
    with pytest.raises(TypeError, match="full-precision"):
        model.merge_spp()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_checks_in_every_dtype(dtype):
    """The merge is W + s·(B A) ⊙ M computed in float32 and cast once; zeros stay +0.0, unmerge is bit-exact, and a
    merge that would not be finite is refused with the weights untouched."""
    model = get_spp_model(pruned(dtype=dtype), ml_config())
    randomize(model)
    bits = {n: lay.base_layer.weight.detach().clone() for n, lay in model.spp_layers()}
    model.merge_spp()
    for n, lay in model.spp_layers():
        w = bits[n].float()
        update = 2.0 * (lay.lora_B["default"].float() @ lay.lora_A["default"].float())
        want = torch.where(w != 0, w + update, torch.zeros_like(w)).to(dtype)
        got = lay.base_layer.weight
        assert torch.equal(got, want) and torch.equal(got == 0, bits[n] == 0) and not torch.signbit(got[bits[n] == 0]).any()
    model.unmerge_spp()
    assert all(torch.equal(lay.base_layer.weight, bits[n]) for n, lay in model.spp_layers())

    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="not be finite"):
        model.merge_spp()
    assert all(torch.equal(lay.base_layer.weight, bits[n]) for n, lay in model.spp_layers())
    assert not any(lay.merged for _, lay in model.spp_layers())


def test_config_validation_and_method_field():
    for bad in (dict(r=0), dict(r=True), dict(lora_alpha="16"), dict(dropout=1.0), dict(target_modules=5)):
        with pytest.raises(ValueError, match="MaskedLoRAConfig"):
            MaskedLoRAConfig(**bad)
    cfg = MaskedLoRAConfig(r=4, lora_alpha=8)
    assert cfg.scale == 2.0 and cfg.to_dict()["method"] == "masked_lora"
    assert SPPConfig().to_dict()["method"] == "spp"
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    old_spp = {k: v for k, v in SPPConfig(r=8).to_dict().items() if k != "method"}  # files from before the field
    assert type(AdapterConfig.from_dict(old_spp)) is SPPConfig
    with pytest.raises(ValueError, match="method is 'masked_lora'.*MaskedLoRAConfig"):
        SPPConfig.from_dict(cfg.to_dict())
    with pytest.raises(ValueError, match="method is 'spp'"):
        MaskedLoRAConfig.from_dict(old_spp)
    with pytest.raises(ValueError, match="method must be one of"):
        AdapterConfig.from_dict({**cfg.to_dict(), "method": "dora"})


# --------------------------------------------------------------------------- train, save, reload, merge
def test_train_save_reload_merge_keeps_the_zeros(tmp_path):
    base_dir = tmp_path / "base"
    pruned().save_pretrained(base_dir)
    base_zeros = zero_masks(AutoModelForCausalLM.from_pretrained(base_dir))
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base_dir), ml_config(dropout=0.1))
    losses = train_steps(model, steps=4, ids=IDS)
    assert losses[-1] < losses[0]
    assert all(lay.lora_B["default"].abs().sum() > 0 for _, lay in model.spp_layers())  # B left zero
    logits = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "spp_config.json").read_text())
    assert saved["method"] == "masked_lora" and saved["base_model_name_or_path"] == str(base_dir)

    unmerged = SPPModel.from_pretrained(tmp_path / "adapter", merge=False)
    assert isinstance(unmerged.active_spp_config, MaskedLoRAConfig)
    torch.testing.assert_close(unmerged(IDS).logits, logits, rtol=0, atol=0)
    merged = SPPModel.from_pretrained(tmp_path / "adapter")
    assert not any(isinstance(m, SPPLinear) for m in merged.modules())
    torch.testing.assert_close(merged(IDS).logits, logits, rtol=1e-5, atol=1e-5)
    after = zero_masks(merged)
    assert after.keys() == base_zeros.keys() and all(torch.equal(after[n], base_zeros[n]) for n in base_zeros)
    in_memory = copy.deepcopy(model).merge_and_unload()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(iter_linear_weights(in_memory), iter_linear_weights(merged)))

    other = pruned(seed=5)  # another pruned base: the fingerprint check refuses it
    from spp_hf import SPPMismatchError

    with pytest.raises(SPPMismatchError, match="MaskedLoRA adapter"):
        SPPModel.from_pretrained(tmp_path / "adapter", base_model=other)


def test_trainer_trains_and_resumes_masked_lora(tmp_path):
    from datasets import Dataset
    from fixtures_trainer import alpaca_records, char_tokenizer, tiny_pruned_base

    from spp_hf import SPPSFTTrainer
    from spp_hf.training.trainer import SPPSFTConfig

    data = Dataset.from_list([{"text": f"{r['instruction']}\n{r['output']}"} for r in alpaca_records(8)])

    def make(out, steps, config):
        args = SPPSFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                            save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, max_length=32,
                            logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)  # fmt: skip
        return SPPSFTTrainer(tiny_pruned_base(), args=args, train_dataset=data, processing_class=char_tokenizer(),
                             spp_config=config)  # fmt: skip

    torch.set_num_threads(1)
    t = make(tmp_path / "out", 2, MaskedLoRAConfig(r=4))
    before = {k: v.clone() for k, v in t.model.spp_state_dict().items()}
    t.train()
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    after = t.model.spp_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))
    t.save_model()
    merged = SPPModel.from_pretrained(tmp_path / "out", base_model=tiny_pruned_base())
    base_zeros = zero_masks(tiny_pruned_base())
    assert all(torch.equal(zero_masks(merged)[n], base_zeros[n]) for n in base_zeros)

    resumed = make(tmp_path / "out", 4, MaskedLoRAConfig(r=4))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    spp = make(tmp_path / "spp", 1, SPPConfig(r=4))
    with pytest.raises(ValueError, match="one cannot be loaded as the other"):
        spp._load_from_checkpoint(str(tmp_path / "out" / "checkpoint-2"))


# --------------------------------------------------------------------------- the two kinds apart and together
def test_spp_and_masked_lora_adapters_cannot_load_as_each_other(tmp_path):
    ml = get_spp_model(pruned(), ml_config(r=4))
    randomize(ml)
    ml.save_pretrained(tmp_path / "ml")
    spp = get_spp_model(pruned(), SPPConfig(r=4))
    randomize(spp)
    spp.save_pretrained(tmp_path / "spp")
    state = {k: v.clone() for k, v in spp.spp_state_dict().items()}
    logits = spp(IDS).logits
    with pytest.raises(ValueError, match="SPPConfig adapter.*MaskedLoRAConfig adapter.*cannot be loaded as the other"):
        spp.load_adapter(tmp_path / "ml", adapter_name="default")
    with pytest.raises(ValueError, match="MaskedLoRAConfig adapter.*SPPConfig adapter"):
        ml.load_adapter(tmp_path / "spp", adapter_name="default")
    assert list(spp.spp_config) == ["default"] and isinstance(spp.active_spp_config, SPPConfig)
    assert all(torch.equal(v, state[k]) for k, v in spp.spp_state_dict().items())
    torch.testing.assert_close(spp(IDS).logits, logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"spp_config\.json.*method is 'masked_lora'"):
        SPPConfig.from_json_file(tmp_path / "ml" / "spp_config.json")
    # each reloads as itself
    assert isinstance(SPPModel.from_pretrained(tmp_path / "ml", base_model=pruned(), merge=False).active_spp_config, MaskedLoRAConfig)
    assert isinstance(SPPModel.from_pretrained(tmp_path / "spp", base_model=pruned(), merge=False).active_spp_config, SPPConfig)


def test_named_adapters_of_both_kinds_side_by_side(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=4))
    model.add_adapter(ml_config(), adapter_name="ml")
    randomize(model, seed=1, adapter="default")
    randomize(model, seed=2, adapter="ml")
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert sorted(layer.adapter_names) == ["default", "ml"]
    assert {n.rsplit(".", 2)[-2] for n, _ in layer.named_parameters() if "base_layer" not in n} == {
        "spp_alpha", "spp_beta", "lora_A", "lora_B"}  # fmt: skip
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["ml"], layer.lora_B["ml"]
    assert model.active_spp_adapter == "ml"
    torch.testing.assert_close(layer(x), reference(x, layer.base_layer, a, b, 2.0), rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ml" in n for n in trainable)
    ml_logits = model(IDS).logits
    model.set_adapter("default")
    spp_logits = model(IDS).logits
    assert not torch.allclose(ml_logits, spp_logits)

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "spp_config.json").read_text())["method"] == "spp"
    assert json.loads((tmp_path / "ml" / "spp_config.json").read_text())["method"] == "masked_lora"
    fresh = get_spp_model(pruned(), SPPConfig(r=4))
    fresh.load_adapter(tmp_path, adapter_name="default")
    fresh.load_adapter(tmp_path / "ml", adapter_name="ml")
    torch.testing.assert_close(fresh(IDS).logits, ml_logits, rtol=0, atol=0)
    fresh.set_adapter("default")
    torch.testing.assert_close(fresh(IDS).logits, spp_logits, rtol=0, atol=0)

    bits = {n: lay.base_layer.weight.detach().clone() for n, lay in model.spp_layers()}
    model.set_adapter("ml")
    model.merge_spp()
    torch.testing.assert_close(model(IDS).logits, ml_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge first"):
        model.set_adapter("default")
    model.unmerge_spp()
    assert all(torch.equal(lay.base_layer.weight, bits[n]) for n, lay in model.spp_layers())
    model.delete_adapter("default")
    assert all(lay.adapter_names == ["ml"] for _, lay in model.spp_layers())
    assert all(not lay.spp_alpha and not lay.spp_beta for _, lay in model.spp_layers())


# --------------------------------------------------------------------------- CLI, Hub, recipe
def test_inspect_and_merge_cli_on_a_masked_lora_adapter(tmp_path, capsys):
    from spp_hf.cli import main as cli_main

    base_dir = tmp_path / "base"
    pruned().save_pretrained(base_dir)
    base_zeros = zero_masks(AutoModelForCausalLM.from_pretrained(base_dir))
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base_dir), ml_config())
    train_steps(model, ids=IDS)
    model.save_pretrained(tmp_path / "adapter")
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits

    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "Masked-LoRA adapter" and info["config"]["method"] == "masked_lora"
    assert info["fingerprint"] == model.active_spp_config.mask_fingerprint["hash"]

    out = tmp_path / "merged"
    assert cli_main(["merge", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(zero_masks(merged)[n], base_zeros[n]) for n in base_zeros)
    record = json.loads((out / "sparsity.json").read_text())
    assert record["kind"] == "merged" and record["spp_config"]["method"] == "masked_lora"
    assert "masked-LoRA adapter" in (out / "README.md").read_text()
    capsys.readouterr()
    assert cli_main(["inspect", str(out)]) == 0
    assert "[ok]" in capsys.readouterr().out


def test_push_and_from_pretrained_over_the_hub(hub, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    from spp_hf.hub.transfer import push_folder

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = pruned()
    write_model_folder(base, None, tmp_path / "base", "# base\n", model_sparsity_record(base, "pruned-base"))
    base_sha = push_folder(tmp_path / "base", "user/tiny-base", token=TOKEN).oid
    model = get_spp_model(AutoModelForCausalLM.from_pretrained("user/tiny-base"), ml_config())
    train_steps(model, ids=IDS)
    model.push_to_hub("user/tiny-base-masked-lora")
    repo = hub.state.repo("user/tiny-base-masked-lora")
    assert repo.resolve("main").message == "Upload Masked-LoRA adapter"
    pushed = json.loads(repo.resolve("main").files["spp_config.json"])
    assert (pushed["method"], pushed["base_model_name_or_path"], pushed["base_model_revision"]) == (
        "masked_lora", "user/tiny-base", base_sha)  # fmt: skip
    expected = copy.deepcopy(model).merge_and_unload()(IDS).logits

    cache = hub.cache_dir.parent / "empty-cache-ml"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    merged = SPPModel.from_pretrained("user/tiny-base-masked-lora")
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(zero_masks(merged)[n], m) for n, m in zero_masks(base).items())


def test_recipe_accepts_method_masked_lora(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "alpaca_sft.py"
    spec = importlib.util.spec_from_file_location("alpaca_sft_ml", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["alpaca_sft_ml"] = recipe
    spec.loader.exec_module(recipe)
    _, _, adapter = recipe.make_parser().parse_args_and_config(
        ["--method", "masked_lora", "--spp_r", "4", "--lora_alpha", "8", "--output_dir", str(tmp_path)]
    )
    config = adapter.to_config()
    assert isinstance(config, MaskedLoRAConfig) and (config.r, config.scale, config.dropout) == (4, 2.0, 0.05)
    _, _, adapter = recipe.make_parser().parse_args_and_config(["--output_dir", str(tmp_path)])
    assert isinstance(adapter.to_config(), SPPConfig)


# --------------------------------------------------------------------------- the real SmolLM2
@pytest.mark.slow
def test_smollm2_masked_lora_round_trip(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prune_magnitude_nm_(base)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base_zeros = zero_masks(base)
    del base
    batch = tok(["The capital of France is Paris.", "Sparse models keep their zeros."], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    targets = r"model\.layers\.(0|1)\.(self_attn\.(q|v)_proj|mlp\.down_proj)"  # a few layers keep it about a minute
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base_dir), MaskedLoRAConfig(r=8, target_modules=targets))
    assert len(list(model.spp_layers())) == 6
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    merged = SPPModel.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=1e-3, atol=1e-3)
    after = zero_masks(merged)
    assert after.keys() == base_zeros.keys() and all(torch.equal(after[n], base_zeros[n]) for n in base_zeros)


def test_describe_folder_tells_the_methods_apart(tmp_path):
    from spp_hf.hub.transfer import describe_folder

    get_spp_model(pruned(), ml_config()).save_pretrained(tmp_path / "ml")
    get_spp_model(pruned(), SPPConfig(r=4)).save_pretrained(tmp_path / "spp")
    assert describe_folder(tmp_path / "ml") == "Masked-LoRA adapter"
    assert describe_folder(tmp_path / "spp") == "SPP adapter"


def test_publish_a_run_with_a_masked_lora_variant(hub, tmp_path, monkeypatch):  # noqa: F811
    """`spp-hf publish` of a run whose method is masked LoRA: base, adapter re-keyed to it, merged model; the
    adapter then loads anywhere and equals the published merged model, with the base's zeros."""
    from huggingface_hub import constants

    from spp_hf.cli import main as cli_main

    run = tmp_path / "runs" / "ml"
    base = pruned()
    write_model_folder(base, None, run / "pruned", "# pruned\n", model_sparsity_record(base, "pruned-base", method="magnitude"))
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(run / "pruned"), ml_config())
    train_steps(model, ids=IDS)
    model.save_pretrained(run / "masked_lora" / "adapter")
    merged = model.merge_and_unload()
    write_model_folder(merged, None, run / "masked_lora" / "merged", "# merged\n", model_sparsity_record(merged, "merged"))

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli_main(["publish", str(run), "user/tiny-ml"]) == 0
    files = hub.state.repo("user/tiny-ml-masked_lora").resolve("main").files
    config = json.loads(files["spp_config.json"])
    assert config["method"] == "masked_lora" and config["base_model_name_or_path"] == "user/tiny-ml"
    assert "masked-LoRA adapter" in files["README.md"].decode()

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    cache = hub.cache_dir.parent / "empty-cache-publish-ml"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    from_adapter = SPPModel.from_pretrained("user/tiny-ml-masked_lora")
    published = AutoModelForCausalLM.from_pretrained("user/tiny-ml-masked_lora-merged")
    ours, theirs = dict(iter_linear_weights(from_adapter)), dict(iter_linear_weights(published))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.equal(zero_masks(from_adapter)[n], m) for n, m in zero_masks(base).items())
