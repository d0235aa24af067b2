"""Injecting SPP into transformers models, adapter files keyed to the base, merge to sparse."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, prune_magnitude_nm_, pruned, rewrite_adapter_config, train_steps
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

from spp_hf import SPPConfig, SPPLinear, SPPMismatchError, SPPModel, get_spp_model, sparsity_report
from spp_hf.adapters.model import SPPModelMixin

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}


def config_for(arch, **kw):
    return SPPConfig(r=8, target_modules=TARGETS.get(arch, SPPConfig().target_modules), **kw)


def masks(model):
    from spp_hf.sparsity import iter_linear_weights

    return {name: (w == 0).clone() for name, w in iter_linear_weights(model)}


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inject_train_save_load_merge(arch, dtype, tmp_path):
    model = pruned(arch, dtype)
    base_masks = masks(model)
    base_logits = model(IDS).logits
    base_cls = type(model)
    model = get_spp_model(model, config_for(arch))
    assert isinstance(model, base_cls) and isinstance(model, SPPModelMixin)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("spp_alpha.default", "spp_beta.default")) for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    # β = 0: starts as the pruned base (fp16 GEMMs on W_eff vs Conv1D's (in, out) layout round differently)
    start_tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else {}
    torch.testing.assert_close(model(IDS).logits, base_logits, **start_tol)
    train_steps(model)
    spp_logits = model(IDS).logits
    assert not torch.allclose(spp_logits.float(), base_logits.float(), atol=1e-4)
    with model.disable_spp():
        torch.testing.assert_close(model(IDS).logits, base_logits)

    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "spp_adapter.safetensors", "spp_config.json"]
    saved = load_file(tmp_path / "spp_adapter.safetensors")
    assert all(k.endswith(("spp_alpha", "spp_beta")) for k in saved)

    merged = SPPModel.from_pretrained(tmp_path, base_model=pruned(arch, dtype))
    assert type(merged) is base_cls
    assert not any(isinstance(m, SPPLinear) for m in merged.modules())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.15)
    torch.testing.assert_close(merged(IDS).logits.float(), spp_logits.float(), **tol)
    after = masks(merged)
    assert all(torch.equal(after[k], base_masks[k]) for k in base_masks)


def test_merge_and_unload_returns_original_class_with_same_zeros(tmp_path):
    model = pruned()
    before = masks(model)
    model = get_spp_model(model, SPPConfig(r=8))
    train_steps(model)
    logits = model(IDS).logits
    plain = model.merge_and_unload()
    assert type(plain) is LlamaForCausalLM
    torch.testing.assert_close(plain(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(masks(plain)[k], before[k]) for k in before)
    plain.save_pretrained(tmp_path)  # a normal checkpoint that plain transformers reloads
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again(IDS).logits, logits, rtol=1e-4, atol=1e-4)


def test_merge_unmerge_in_place():
    model = get_spp_model(pruned(), SPPConfig(r=8))
    train_steps(model)
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    original = weight.detach().clone()
    logits = model(IDS).logits
    model.merge_spp()
    assert not torch.allclose(weight, original)
    torch.testing.assert_close(model(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    with model.disable_spp():
        torch.testing.assert_close(weight, original, rtol=1e-5, atol=1e-6)
    model.unmerge_spp()
    torch.testing.assert_close(weight, original, rtol=1e-5, atol=1e-6)
    assert torch.equal(weight == 0, original == 0)


def test_merge_refuses_nan_and_touches_nothing():
    model = get_spp_model(pruned(), SPPConfig(r=8))
    train_steps(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.spp_alpha["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_spp()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_named_adapters_and_set_adapter(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    train_steps(model, seed=1)
    logits_a = model(IDS).logits
    get_spp_model(model, SPPConfig(r=4), adapter_name="other")
    assert model.active_spp_adapter == "other"
    assert model.model.layers[0].self_attn.q_proj.spp_alpha["other"].shape[0] == 4
    train_steps(model, seed=2)
    logits_b = model(IDS).logits
    model.set_adapter("default")
    torch.testing.assert_close(model(IDS).logits, logits_a)
    model.set_adapter("other")
    torch.testing.assert_close(model(IDS).logits, logits_b)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "spp_config.json").exists() and (tmp_path / "other" / "spp_config.json").exists()
    fresh = get_spp_model(pruned(), SPPConfig(r=8))
    fresh.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(fresh(IDS).logits, logits_b)


def test_config_records_base_and_fingerprint(tmp_path):
    model = pruned()
    model.name_or_path = "user/tiny-wanda24"
    model = get_spp_model(model, SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "spp_config.json").read_text())
    assert data["base_model_name_or_path"] == "user/tiny-wanda24"
    assert data["spp_hf_version"] and data["format_version"] == 1
    fp = data["mask_fingerprint"]
    q = fp["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["shape"] == [64, 64] and q["zeros"] == 64 * 64 // 2
    assert len(fp["modules"]) == 2 * 7


def test_wrong_base_is_refused_naming_module(tmp_path):
    model = get_spp_model(pruned(seed=0), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    other = make_tiny_model("llama", seed=0)
    prune_magnitude_nm_(other)
    with torch.no_grad():  # one weight flipped from zero to non-zero in one module
        w = other.model.layers[1].mlp.up_proj.weight
        idx = (w == 0).nonzero()[0]
        w[idx[0], idx[1]] = 1.0
    with pytest.raises(SPPMismatchError, match=r"model\.layers\.1\.mlp\.up_proj.*strict=False"):
        SPPModel.from_pretrained(tmp_path, base_model=other)
    with pytest.warns(UserWarning, match="up_proj"):
        SPPModel.from_pretrained(tmp_path, base_model=other, strict=False)


def test_adapter_added_after_strict_false_load_is_keyed_to_its_own_base(tmp_path):
    """Base X's adapter loaded onto base Y with strict=False; an adapter added there was trained on Y:
    it records Y's zeros, name and revision, so it loads onto Y and is refused on X."""
    x, y = pruned(seed=0), pruned(seed=1)
    x.name_or_path, x.config._commit_hash = "user/base-x", "a" * 40
    y.name_or_path, y.config._commit_hash = "user/base-y", "b" * 40
    get_spp_model(x, config_for("llama")).save_pretrained(tmp_path / "on_x")
    with pytest.warns(UserWarning, match="mask hash"):
        model = SPPModel.from_pretrained(tmp_path / "on_x", base_model=y, merge=False, strict=False, is_trainable=True)
    model.add_adapter(SPPConfig(r=4), adapter_name="new")
    train_steps(model)
    logits = model(IDS).logits
    model.save_pretrained(tmp_path / "new", selected_adapters=["new"])
    saved = json.loads((tmp_path / "new" / "spp_config.json").read_text())
    assert saved["mask_fingerprint"] == model.spp_fingerprint()
    assert (saved["base_model_name_or_path"], saved["base_model_revision"]) == ("user/base-y", "b" * 40)
    on_y = SPPModel.from_pretrained(tmp_path / "new", base_model=pruned(seed=1))
    torch.testing.assert_close(on_y(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(SPPMismatchError, match="strict=False"):
        SPPModel.from_pretrained(tmp_path / "new", base_model=pruned(seed=0))


def test_target_modules_matching_nothing_lists_names():
    model = pruned()
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        get_spp_model(model, SPPConfig(target_modules=["query_key_value"]))
    assert not isinstance(model, SPPModelMixin) and all(p.requires_grad for p in model.parameters())


def test_bad_r_names_module_and_changes_nothing():
    model = pruned()
    with pytest.raises(ValueError, match=r"r=7 .*k_proj.*Valid r values"):
        get_spp_model(model, SPPConfig(r=7, target_modules=["k_proj"]))
    assert not any(isinstance(m, SPPLinear) for m in model.modules())


def test_unwrappable_target_is_refused():
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"):
        get_spp_model(pruned(), SPPConfig(target_modules=["embed_tokens"]))


def test_all_linear_skips_lm_head_and_regex_targets():
    model = get_spp_model(pruned(), SPPConfig(r=8, target_modules="all-linear"))
    names = [n for n, _ in model.spp_layers()]
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    model2 = get_spp_model(pruned(), SPPConfig(r=8, target_modules=r".*\.0\.self_attn\.(q|v)_proj"))
    assert [n for n, _ in model2.spp_layers()] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_missing_or_corrupt_adapter_files(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    (tmp_path / "spp_adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())
    (tmp_path / "spp_adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="spp_adapter.safetensors"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())
    model.save_pretrained(tmp_path)
    (tmp_path / "spp_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not an SPP adapter"):
        SPPModel.from_pretrained(lora, base_model=pruned())


def test_adapter_shapes_must_fit(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "spp_config.json").read_text())
    cfg["r"] = 4  # config now disagrees with the stored tensors
    rewrite_adapter_config(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"spp_alpha has shape \(8, \d+\), expected \(4, \d+\)"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())


def test_newer_format_is_refused(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "spp_config.json").read_text())
    cfg["format_version"] = 99
    rewrite_adapter_config(tmp_path, cfg)
    with pytest.raises(ValueError, match="pip install -U spp-hf"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    good = (tmp_path / "spp_adapter.safetensors").read_bytes()
    train_steps(model)
    import spp_hf.storage

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(spp_hf.storage, "save_file", boom)  # the one writer of adapter weights
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "spp_adapter.safetensors").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_base_model_none_reads_config(tmp_path):
    base_dir = tmp_path / "base"
    base = pruned()
    base.save_pretrained(base_dir)
    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base_dir), SPPConfig(r=8))
    train_steps(model)
    logits = model(IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "spp_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    merged = SPPModel.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(merged(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    unmerged = SPPModel.from_pretrained(tmp_path / "adapter", merge=False)
    assert isinstance(unmerged, SPPModelMixin) and not any(p.requires_grad for p in unmerged.parameters())
    trainable = SPPModel.from_pretrained(tmp_path / "adapter", merge=False, is_trainable=True)
    assert {n.rsplit(".", 2)[-2] for n, p in trainable.named_parameters() if p.requires_grad} == {"spp_alpha", "spp_beta"}


def test_sparsity_report_detects_patterns():
    model = pruned("gpt2")
    report = sparsity_report(model)
    assert report.pattern == "2:4" and abs(report.ratio - 0.5) < 1e-9
    dense = make_tiny_model("llama")
    assert sparsity_report(dense).pattern is None
    assert "total" in str(report)


def test_quantized_base_merge_refused():
    bnb = pytest.importorskip("bitsandbytes")
    from spp_hf.layer_weights import set_dense_weight

    layer = bnb.nn.Linear4bit(64, 64, bias=False)
    with pytest.raises(TypeError, match="full-precision"):
        set_dense_weight(layer, torch.zeros(64, 64))


def test_gpt2_is_conv1d_and_merges():
    model = get_spp_model(pruned("gpt2"), config_for("gpt2"))
    assert isinstance(model, GPT2LMHeadModel)
    assert type(model.transformer.h[0].attn.c_attn.base_layer).__name__ == "Conv1D"
