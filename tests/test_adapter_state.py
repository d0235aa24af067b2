"""Adapter state you can trust (issue 13): every transition validated first and all-or-nothing, exact
merges in every dtype, scratch buffers under every grad mode, no network, tied targets refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import pruned, rewrite_adapter_config
from torch import nn

from spp_hf import SPPConfig, SPPLinear, SPPMismatchError, SPPModel, get_spp_model

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"]}
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def config_for(arch="llama", **kw):
    kw.setdefault("r", 8)
    return SPPConfig(target_modules=TARGETS.get(arch, SPPConfig().target_modules), **kw)


def randomize(model, std=0.3, seed=1, adapter=None):
    """Move every factor of an adapter away from its init (independent of any training code)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.spp_layers():
            for p in layer.adapter_parameters(adapter).values():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def base_weights(model):
    """Every frozen parameter, cloned (bitwise reference)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "spp_" not in n}


def same_bits(model, reference):
    now = base_weights(model)
    return now.keys() == reference.keys() and all(
        torch.equal(now[k].view(torch.uint8) if now[k].dtype.is_floating_point else now[k], reference[k].view(torch.uint8))
        for k in reference
    )


# --------------------------------------------------------------------------- 1: scratch under inference mode
@pytest.mark.parametrize("order", [("inference", "no_grad", "grad"), ("grad", "inference", "no_grad"), ("no_grad", "inference", "grad")])
def test_scratch_buffers_work_in_any_grad_mode_order(order):
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    layer = SPPLinear(lin, "default", SPPConfig(r=4, impl="fused"))
    randomize_layer(layer)
    x = torch.randn(3, 32)
    ref = x @ (lin.weight * (1 + 2.0 * torch.repeat_interleave(layer.spp_alpha["default"], 12, 0) * layer.spp_beta["default"])).T + lin.bias
    for _ in range(2):
        for mode in order:
            if mode == "inference":
                with torch.inference_mode():
                    y = layer(x)
            elif mode == "no_grad":
                with torch.no_grad():
                    y = layer(x)
            else:
                y = layer(x)
                y.sum().backward()
            torch.testing.assert_close(y.detach(), ref.detach(), rtol=1e-5, atol=1e-5)


def randomize_layer(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------- 2, 3: merged model refuses
def test_add_adapter_on_merged_model_refused_and_unmerge_is_exact():
    model = get_spp_model(pruned(), SPPConfig(r=8))
    reference = base_weights(model)
    randomize(model)
    model.merge_spp()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.add_adapter(SPPConfig(r=4), adapter_name="other")
    assert list(model.spp_config) == ["default"] and model.active_spp_adapter == "default"
    model.unmerge_spp()
    assert same_bits(model, reference)


def test_load_adapter_into_merged_model_refused(tmp_path):
    donor = get_spp_model(pruned(), SPPConfig(r=8))
    randomize(donor, seed=5)
    donor.save_pretrained(tmp_path)
    model = get_spp_model(pruned(), SPPConfig(r=8))
    reference = base_weights(model)
    randomize(model)
    model.merge_spp()
    merged_logits = model(IDS).logits
    for name in ("default", "new"):
        with pytest.raises(RuntimeError, match="unmerge"):
            model.load_adapter(tmp_path, adapter_name=name)
    torch.testing.assert_close(model(IDS).logits, merged_logits, rtol=0, atol=0)
    model.unmerge_spp()
    assert same_bits(model, reference)


# --------------------------------------------------------------------------- 4: failed load changes nothing
def test_failed_load_adapter_changes_nothing(tmp_path):
    other_base = pruned(seed=3)
    donor = get_spp_model(other_base, SPPConfig(r=8))
    donor.save_pretrained(tmp_path / "wrong_base")
    small = get_spp_model(pruned(), SPPConfig(r=4))
    small.save_pretrained(tmp_path / "r4")
    data = json.loads((tmp_path / "r4" / "spp_config.json").read_text())
    data["r"] = 8  # config says 8, tensors are r=4 (one consistent save, so the shapes are what is wrong)
    rewrite_adapter_config(tmp_path / "r4", data)

    model = get_spp_model(pruned(), SPPConfig(r=8))
    randomize(model)
    logits = model(IDS).logits
    state = {k: v.clone() for k, v in model.spp_state_dict().items()}
    config = copy.deepcopy(model.spp_config)
    with pytest.raises(SPPMismatchError):
        model.load_adapter(tmp_path / "wrong_base", adapter_name="new")
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(tmp_path / "r4", adapter_name="default")
    assert model.spp_config == config and model.active_spp_adapter == "default"
    assert all(layer.adapter_names == ["default"] for _, layer in model.spp_layers())
    assert all(torch.equal(v, state[k]) for k, v in model.spp_state_dict().items())
    torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "again")
    again = get_spp_model(pruned(), SPPConfig(r=8))
    again.load_adapter(tmp_path / "again")
    torch.testing.assert_close(again(IDS).logits, logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- 5: configs are copied
def test_config_object_is_never_mutated():
    config = SPPConfig(r=8)
    before = copy.deepcopy(config)
    a = get_spp_model(pruned(seed=0), config)
    b = get_spp_model(pruned(seed=1), config)
    assert config == before
    assert a.active_spp_config is not config and b.active_spp_config is not config
    assert a.active_spp_config.mask_fingerprint["hash"] != b.active_spp_config.mask_fingerprint["hash"]
    assert b.active_spp_config.mask_fingerprint == b.spp_fingerprint()
    c = SPPConfig(r=4)
    a.add_adapter(c, adapter_name="second")
    assert c == SPPConfig(r=4)


def test_reused_config_is_keyed_to_each_base():
    """A config filled for base X (its fingerprint, name, revision) and reused on base Y records Y, for
    get_spp_model and add_adapter alike; base fields the user set on a fresh config are kept."""
    x, y = pruned(seed=0), pruned(seed=1)
    x.name_or_path, x.config._commit_hash = "user/base-x", "a" * 40
    y.name_or_path, y.config._commit_hash = "user/base-y", "b" * 40
    on_x = get_spp_model(x, SPPConfig(r=8))
    filled = on_x.active_spp_config
    before = copy.deepcopy(filled)
    on_y = get_spp_model(y, filled).active_spp_config
    assert on_y.mask_fingerprint == y.spp_fingerprint() != filled.mask_fingerprint
    assert (on_y.base_model_name_or_path, on_y.base_model_revision) == ("user/base-y", "b" * 40)
    assert filled == before and filled.mask_fingerprint == on_x.spp_fingerprint()
    unnamed = get_spp_model(pruned(seed=2), filled).active_spp_config  # an in-memory base: nothing of X survives
    assert unnamed.mask_fingerprint["hash"] != filled.mask_fingerprint["hash"]
    assert (unnamed.base_model_name_or_path, unnamed.base_model_revision) == (None, None)
    other = get_spp_model(pruned(seed=1), SPPConfig(r=8))
    other.add_adapter(filled, adapter_name="second")
    assert other.active_spp_config.mask_fingerprint == other.spp_fingerprint() != filled.mask_fingerprint
    explicit = SPPConfig(r=8, base_model_name_or_path="user/hub-copy", base_model_revision="c" * 40)
    kept = get_spp_model(pruned(seed=1), explicit).active_spp_config
    assert (kept.base_model_name_or_path, kept.base_model_revision) == ("user/hub-copy", "c" * 40)
    filled.base_model_revision = "d" * 40  # pinned by hand on X's own adapter: a further adapter on X keeps it
    on_x.add_adapter(SPPConfig(r=4), adapter_name="second")
    assert (on_x.active_spp_config.base_model_name_or_path, on_x.active_spp_config.base_model_revision) == ("user/base-x", "d" * 40)


# --------------------------------------------------------------------------- 6: exact merges
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_unmerge_and_disable_are_bit_exact(arch, dtype):
    model = get_spp_model(pruned(arch, dtype), config_for(arch))
    reference = base_weights(model)
    base_logits = model(IDS).logits
    randomize(model, std=0.1)
    logits = model(IDS).logits
    model.merge_spp()
    merged = base_weights(model)
    for name, w in merged.items():  # zeros stay +0.0, non-zeros stay non-zero
        was_zero = reference[name] == 0
        assert torch.equal(w == 0, was_zero), name
        assert not torch.signbit(w[was_zero]).any(), name
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.2)
    torch.testing.assert_close(model(IDS).logits.float(), logits.float(), **tol)
    with model.disable_spp():
        assert same_bits(model, reference)
        torch.testing.assert_close(model(IDS).logits, base_logits, rtol=0, atol=0)
    assert all(torch.equal(base_weights(model)[k], merged[k]) for k in merged)
    model.unmerge_spp()
    assert same_bits(model, reference)


def test_merge_refused_when_it_would_create_a_zero(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    reference = base_weights(model)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # 1 + s·α·β = 0 on row 0: every non-zero of that row would become zero
        layer.spp_alpha["default"].fill_(1.0)
        layer.spp_beta["default"][0] = -0.5
    with pytest.raises(ValueError, match="zero"):
        model.merge_spp()
    assert same_bits(model, reference) and not any(l.merged for _, l in model.spp_layers())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="zero"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())


@pytest.mark.parametrize("case", ["overflow", "underflow"])
def test_merge_checks_after_the_cast_to_fp16(case):
    """Finite and non-zero in float32 is not enough: the merged fp16 weight must be too."""
    model = get_spp_model(pruned(dtype=torch.float16), SPPConfig(r=8))
    layer = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        w = layer.base_layer.weight
        w[w != 0] = 60000.0 if case == "overflow" else 1e-4
        layer.spp_alpha["default"].fill_(1.0)
        layer.spp_beta["default"].fill_(1.0 if case == "overflow" else -0.49995)  # factor 3 / 1e-4
    reference = base_weights(model)
    with pytest.raises(ValueError, match="finite" if case == "overflow" else "zero"):
        model.merge_spp()
    assert same_bits(model, reference)


def test_unmerge_never_divides_by_zero():
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, ::2] = 0.0
    original = lin.weight.detach().clone()
    layer = SPPLinear(lin, "default", SPPConfig(r=2))
    randomize_layer(layer)
    layer.merge()
    layer.unmerge()
    assert torch.equal(lin.weight, original) and torch.isfinite(lin.weight).all()


# --------------------------------------------------------------------------- 7: fused path precision
def test_fused_computes_in_float32_with_bf16_adapter():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    layer = SPPLinear(lin, "default", SPPConfig(r=8, impl="fused", adapter_dtype="bfloat16"))
    randomize_layer(layer)
    x = torch.randn(4, 64, dtype=torch.float64)
    a, b = (p.detach().double() for p in layer.adapter_parameters().values())
    w = lin.weight.detach().double()
    ref = x @ (w * (1 + 2.0 * torch.repeat_interleave(a, 8, 0) * b)).T
    for impl in ("fused", "naive", "blocked"):
        layer.impl["default"] = impl
        err = (layer(x.float()).double() - ref).abs().max().item()
        assert err < 1e-4, (impl, err)


# --------------------------------------------------------------------------- 8: tied targets
def test_tied_target_is_refused():
    gpt2 = pruned("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    with pytest.raises(ValueError, match="tied|shared"):
        get_spp_model(gpt2, SPPConfig(r=8, target_modules=["lm_head"]))
    assert not any(isinstance(m, SPPLinear) for m in gpt2.modules())


# --------------------------------------------------------------------------- 9: no network
def test_get_spp_model_records_commit_without_network(monkeypatch, tmp_path):
    """The base commit comes from the model's config or the HF cache; any HTTP request fails the test."""
    import httpx2 as httpx  # huggingface_hub's HTTP client
    from huggingface_hub import constants

    def no_network(*a, **k):
        raise AssertionError("network access in get_spp_model")

    monkeypatch.setattr(httpx.Client, "send", no_network)
    monkeypatch.setattr(httpx.AsyncClient, "send", no_network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model = pruned()
    model.name_or_path = "org/some-base"
    with pytest.warns(UserWarning, match="revision base 'org/some-base' was loaded from is unknown"):
        assert get_spp_model(model, SPPConfig(r=8)).active_spp_config.base_model_revision is None
    refs = tmp_path / "models--org--some-base" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("b" * 40)  # what from_pretrained leaves in the cache after loading a Hub base
    model = pruned()
    model.name_or_path = "org/some-base"
    assert get_spp_model(model, SPPConfig(r=8)).active_spp_config.base_model_revision == "b" * 40
    model = pruned()
    model.name_or_path = "org/some-base"
    model.config._commit_hash = "a" * 40
    assert get_spp_model(model, SPPConfig(r=8)).active_spp_config.base_model_revision == "a" * 40


# --------------------------------------------------------------------------- names and signatures
def test_adapter_methods_follow_transformers_signatures(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.add_adapter(SPPConfig(r=4), adapter_name="b")
    assert model.active_spp_adapter == "b"
    model.set_adapter("default")
    names = [n for n, _ in model.named_parameters() if "q_proj.spp_alpha" in n and "layers.0." in n]
    assert names == ["model.layers.0.self_attn.q_proj.spp_alpha.default", "model.layers.0.self_attn.q_proj.spp_alpha.b"]
    with pytest.raises(TypeError, match="SPPConfig"):
        model.add_adapter({"r": 4}, adapter_name="c")
    from peft import LoraConfig

    with pytest.raises(TypeError, match="SPPConfig"):
        model.add_adapter(LoraConfig(r=4), adapter_name="c")
    model.save_pretrained(tmp_path)
    fresh = get_spp_model(pruned(), SPPConfig(r=8))
    fresh.load_adapter(tmp_path / "b", adapter_name="b")
    assert fresh.active_spp_adapter == "b"


def test_inactive_adapters_move_and_cast_with_the_model():
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.add_adapter(SPPConfig(r=4), adapter_name="b")
    model.to(torch.float64)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.spp_alpha["default"].dtype == torch.float64 and layer.spp_alpha["b"].dtype == torch.float64
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.spp_beta.default" in keys and "model.layers.0.self_attn.q_proj.spp_beta.b" in keys


@pytest.mark.parametrize("name", ["../x", "a/b", "", "a.b", ".hidden", "x" * 200])
def test_bad_adapter_names_are_refused_before_anything_is_written(tmp_path, name):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(SPPConfig(r=4), adapter_name=name)
    with pytest.raises(ValueError, match="adapter name"):
        get_spp_model(pruned(), SPPConfig(r=8), adapter_name=name)
    assert list(model.spp_config) == ["default"]
    model.save_pretrained(tmp_path / "save")
    assert not (tmp_path / "x").exists()


def test_delete_and_set_adapter_validate_first():
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.add_adapter(SPPConfig(r=4), adapter_name="b")
    with pytest.raises(ValueError, match="active"):
        model.delete_adapter("b")
    with pytest.raises(KeyError, match="nope"):
        model.delete_adapter(["default", "nope"])
    assert list(model.spp_config) == ["default", "b"]
    model.set_adapter("default")
    model.delete_adapter("b")
    assert all(layer.adapter_names == ["default"] for _, layer in model.spp_layers())
    with pytest.raises(KeyError):
        model.set_adapter("b")


def test_set_adapter_on_merged_model_refused():
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.add_adapter(SPPConfig(r=4), adapter_name="b")
    randomize(model, adapter="b")
    model.merge_spp()
    with pytest.raises(RuntimeError, match="unmerge"):
        model.set_adapter("default")
    assert model.active_spp_adapter == "b"
    model.set_adapter("b")  # a no-op is fine


# --------------------------------------------------------------------------- issue 15 items owned here
def test_save_without_default_puts_active_at_root(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8), adapter_name="a")
    model.add_adapter(SPPConfig(r=4), adapter_name="b")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "spp_config.json").read_text())["r"] == 4  # b is active: at the root
    assert json.loads((tmp_path / "a" / "spp_config.json").read_text())["r"] == 8
    assert not (tmp_path / "b").exists()


def test_untrusted_regex_is_not_evaluated_on_load(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    randomize(model)
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "spp_config.json").read_text())
    data["target_modules"] = "(.*.*)*X"  # catastrophic backtracking on every module name
    rewrite_adapter_config(tmp_path, data)
    import re

    real = re.fullmatch

    def guarded(pattern, *a, **k):
        assert pattern != "(.*.*)*X", "the saved regex was evaluated"
        return real(pattern, *a, **k)

    import spp_hf.adapters.model

    monkey = pytest.MonkeyPatch()
    monkey.setattr(spp_hf.adapters.model.re, "fullmatch", guarded)
    try:
        merged = SPPModel.from_pretrained(tmp_path, base_model=pruned())
        fresh = get_spp_model(pruned(), SPPConfig(r=8))
        fresh.load_adapter(tmp_path)
    finally:
        monkey.undo()
    torch.testing.assert_close(merged(IDS).logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fresh(IDS).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "field,value",
    [("format_version", "2"), ("dropout", "0.1"), ("r", True), ("target_modules", 5), ("scale", "big"),
     ("use_beta", "yes"), ("mask_fingerprint", [1]), ("base_model_name_or_path", 3)],
)  # fmt: skip
def test_wrong_config_types_name_file_and_field(tmp_path, field, value):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "spp_config.json").read_text())
    data[field] = value
    rewrite_adapter_config(tmp_path, data)
    with pytest.raises(ValueError, match=rf"spp_config\.json.*{field}") as info:
        SPPModel.from_pretrained(tmp_path, base_model=pruned())
    assert "save" in str(info.value) or "fix" in str(info.value).lower()


def _drop(key):
    return lambda fp: {k: v for k, v in fp.items() if k != key}


def _entry(change):
    """Apply `change` to the first module entry of a fingerprint."""

    def apply(fp):
        name = next(iter(fp["modules"]))
        return {**fp, "modules": {**fp["modules"], name: change(fp["modules"][name])}}

    return apply


BAD_FINGERPRINTS = {
    "no_hash": (_drop("hash"), r"mask_fingerprint\['hash'\]"),
    "hash_not_string": (lambda fp: {**fp, "hash": 5}, r"mask_fingerprint\['hash'\]"),
    "no_modules": (_drop("modules"), r"mask_fingerprint\['modules'\]"),
    "empty_modules": (lambda fp: {**fp, "modules": {}}, r"mask_fingerprint\['modules'\].*non-empty"),
    "modules_a_list": (lambda fp: {**fp, "modules": list(fp["modules"])}, r"mask_fingerprint\['modules'\]"),
    "entry_not_object": (_entry(lambda e: "0123abcd"), r"mask_fingerprint\['modules'\]\['model\.layers\.0\."),
    "entry_a_list": (_entry(lambda e: list(e.values())), r"mask_fingerprint\['modules'\]\['model\.layers\.0\."),
    "no_shape": (_entry(lambda e: {"zeros": e["zeros"], "hash": e["hash"]}), r"\['shape'\]"),
    "shape_a_string": (_entry(lambda e: {**e, "shape": "64x64"}), r"\['shape'\]"),
    "shape_one_dim": (_entry(lambda e: {**e, "shape": [64]}), r"\['shape'\]"),
    "shape_floats": (_entry(lambda e: {**e, "shape": [64.0, 64.0]}), r"\['shape'\]"),
    "zeros_a_string": (_entry(lambda e: {**e, "zeros": "32"}), r"\['zeros'\]"),
    "zeros_bool": (_entry(lambda e: {**e, "zeros": True}), r"\['zeros'\]"),
    "zeros_negative": (_entry(lambda e: {**e, "zeros": -1}), r"\['zeros'\]"),
    "zeros_beyond_shape": (_entry(lambda e: {**e, "zeros": 64 * 64 + 1}), r"\['zeros'\]"),
    "module_hash_missing": (_entry(lambda e: {"shape": e["shape"], "zeros": e["zeros"]}), r"\['hash'\]"),
    "module_hash_not_string": (_entry(lambda e: {**e, "hash": 7}), r"\['hash'\]"),
}


@pytest.mark.parametrize("case", list(BAD_FINGERPRINTS))
def test_malformed_fingerprint_is_refused_naming_field_and_fix(tmp_path, case):
    """Refused when the config is built (in code, from_dict, from a file), never a raw TypeError later."""
    from spp_hf import MaskedLoRAConfig
    from spp_hf.adapters.config import AdapterConfig

    change, where = BAD_FINGERPRINTS[case]
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    bad = change(copy.deepcopy(model.active_spp_config.mask_fingerprint))
    for build in (lambda: SPPConfig(r=8, mask_fingerprint=bad), lambda: MaskedLoRAConfig(mask_fingerprint=bad),
                  lambda: AdapterConfig.from_dict({"r": 8, "mask_fingerprint": bad})):  # fmt: skip
        with pytest.raises(ValueError, match=where) as info:
            build()
        assert "save the adapter again" in str(info.value) and "remove mask_fingerprint" in str(info.value)
    data = json.loads((tmp_path / "spp_config.json").read_text())
    rewrite_adapter_config(tmp_path, {**data, "mask_fingerprint": bad})
    with pytest.raises(ValueError, match=rf"spp_config\.json.*{where}"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())
    with pytest.raises(ValueError, match=rf"spp_config\.json.*{where}"):
        get_spp_model(pruned(), SPPConfig(r=8)).load_adapter(tmp_path)


def test_non_utf8_config_is_a_clear_error(tmp_path):
    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    (tmp_path / "spp_config.json").write_bytes(b'{"r": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"spp_config\.json.*UTF-8"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_bad_adapter_tensors_are_refused(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    model = get_spp_model(pruned(), SPPConfig(r=8))
    model.save_pretrained(tmp_path)
    path = tmp_path / "spp_adapter.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    if bad == "int":
        state[key] = state[key].to(torch.int32)
    else:
        state[key][0, 0] = float(bad)
    save_file(state, path)
    fresh = get_spp_model(pruned(), SPPConfig(r=8))
    before = {k: v.clone() for k, v in fresh.spp_state_dict().items()}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        fresh.load_adapter(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in fresh.spp_state_dict().items())
    with pytest.raises(ValueError, match="finite|floating"):
        SPPModel.from_pretrained(tmp_path, base_model=pruned())


def test_old_format_adapter_files_still_load(tmp_path):
    """An adapter saved by the previous layer API (same keys, format 1) loads unchanged."""
    from safetensors.torch import save_file

    model = get_spp_model(pruned(), SPPConfig(r=8))
    randomize(model)
    logits = model(IDS).logits
    tensors = {k: v.detach().clone() for k, v in model.spp_state_dict().items()}
    assert all(k.endswith((".spp_alpha", ".spp_beta")) for k in tensors)
    save_file(tensors, tmp_path / "spp_adapter.safetensors", metadata={"format": "pt", "spp_adapter": "default"})
    config = model.active_spp_config.to_dict()
    config.pop("spp_hf_version")
    (tmp_path / "spp_config.json").write_text(json.dumps(config))
    merged = SPPModel.from_pretrained(tmp_path, base_model=pruned())
    torch.testing.assert_close(merged(IDS).logits, logits, rtol=1e-4, atol=1e-4)
