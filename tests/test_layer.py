"""SPP math: the three implementations against the paper's Eq. 4-5 written as plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spp_hf import SPPConfig, SPPLinear
from spp_hf.adapters.spp import _FusedSPP, spp_branch_blocked, spp_branch_naive

IMPLS = ["naive", "blocked", "fused"]


def paper_reference(x, w, b, alpha, beta, s):
    """Eq. 4-5 with an explicit repeat_interleave, independent of spp_hf."""
    m, r = w.shape[0], alpha.shape[0]
    w_prime = w * torch.repeat_interleave(alpha, m // r, dim=0) * beta  # Repeat_1(β, n) by broadcasting
    y = x @ w.T + s * (x @ w_prime.T)
    return y if b is None else y + b


def sparse_linear(m=48, n=32, dtype=torch.float64, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.5] = 0.0
    return lin


def spp(base, dtype=None, **kw) -> SPPLinear:
    """An SPPLinear with one adapter "default" configured by SPPConfig(**kw)."""
    if dtype is not None:
        kw["adapter_dtype"] = str(dtype).removeprefix("torch.")
    return SPPLinear(base, "default", SPPConfig(**kw))


def factors(layer: SPPLinear):
    """(α, β) of the active adapter."""
    p = layer.adapter_parameters()
    return p["spp_alpha"], p["spp_beta"]


def random_factors(layer: SPPLinear, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in factors(layer):
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_paper_equation(impl, bias):
    lin = sparse_linear(bias=bias)
    layer = spp(lin, torch.float64, r=4, scale=2.0, impl=impl)
    random_factors(layer)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    ref = paper_reference(x, lin.weight, lin.bias, *factors(layer), 2.0)
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_reference_autograd(impl):
    lin = sparse_linear()
    layer = spp(lin, torch.float64, r=8, scale=1.5, impl=impl)
    random_factors(layer)
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    got = (x.grad.clone(), factors(layer)[0].grad.clone(), factors(layer)[1].grad.clone())
    assert lin.weight.grad is None and not lin.weight.requires_grad  # the base stays frozen
    alpha = factors(layer)[0].detach().clone().requires_grad_()
    beta = factors(layer)[1].detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    paper_reference(x2, lin.weight.detach(), lin.bias.detach(), alpha, beta, 1.5).pow(2).sum().backward()
    for a, b in zip(got, (x2.grad, alpha.grad, beta.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_float64():
    lin = sparse_linear(m=16, n=8)
    w, b = lin.weight.detach(), lin.bias.detach()
    alpha = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(16, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, be: _FusedSPP.apply(x, w, b, a, be, 2.0, 0.0), (x, alpha, beta))
    assert torch.autograd.gradcheck(lambda x, a, be: spp_branch_blocked(x, w, a, be), (x, alpha, beta))
    assert torch.autograd.gradcheck(lambda x, a, be: spp_branch_naive(x, w, a, be), (x, alpha, beta))

    def fused_dropout(x, a, be):
        torch.manual_seed(7)  # same dropout mask on every evaluation
        return _FusedSPP.apply(x, w, b, a, be, 2.0, 0.25)

    assert torch.autograd.gradcheck(fused_dropout, (x, alpha, beta))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_double_backward(dropout):
    """create_graph=True (e.g. a gradient penalty) differentiates through the fused backward."""
    lin = sparse_linear(m=16, n=8)
    w, b = lin.weight.detach(), lin.bias.detach()
    alpha = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(16, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def fused(x, a, be):
        torch.manual_seed(7)
        return _FusedSPP.apply(x, w, b, a, be, 2.0, dropout)

    assert torch.autograd.gradgradcheck(fused, (x, alpha, beta))
    if dropout == 0.0:  # and equals the second derivative of the paper's formula
        def penalty(f):
            (gx,) = torch.autograd.grad(f(x, alpha, beta).pow(2).sum(), x, create_graph=True)
            return torch.autograd.grad(gx.pow(2).sum(), (alpha, beta))

        for got, want in zip(penalty(fused), penalty(lambda x, a, be: paper_reference(x, w, b, a, be, 2.0))):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fused_dropout_matches_formula_with_its_mask():
    lin = sparse_linear()
    layer = spp(lin, torch.float64, r=4, dropout=0.3, impl="fused").train()
    random_factors(layer)
    x = torch.randn(64, 32, dtype=torch.float64)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.7)
    m = lin.weight.shape[0]
    alpha, beta = factors(layer)
    w_prime = lin.weight * alpha.repeat_interleave(m // 4, 0) * beta
    ref = x @ lin.weight.T + lin.bias + 2.0 * ((x * keep / 0.7) @ w_prime.T)
    torch.testing.assert_close(y, ref)
    assert not torch.allclose(y, paper_reference(x, lin.weight, lin.bias, *factors(layer), 2.0))
    layer.eval()  # no dropout in eval
    torch.testing.assert_close(layer(x), paper_reference(x, lin.weight, lin.bias, *factors(layer), 2.0))


def test_init_is_identity_and_parameters_are_named():
    lin = sparse_linear(dtype=torch.float32)
    layer = spp(lin, r=16)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["spp_alpha.default", "spp_beta.default"]
    alpha, beta = factors(layer)
    assert alpha.shape == (16, 32) and beta.shape == (48, 1)
    assert torch.all(beta == 0)
    bound = 1 / math.sqrt(32)  # kaiming-uniform with a=sqrt(5) on fan_in=32
    assert alpha.abs().max() <= bound and alpha.std() > bound / 4
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), lin(x))


def test_ablation_zero_init_alpha_and_no_beta():
    lin = sparse_linear(dtype=torch.float32)
    a = spp(lin, r=4, zero_init="alpha")
    assert torch.all(factors(a)[0] == 0) and factors(a)[1].abs().sum() > 0
    no_beta = spp(lin, r=4, use_beta=False, zero_init="alpha")
    assert torch.all(factors(no_beta)[1] == 1) and not factors(no_beta)[1].requires_grad
    assert [n for n, p in no_beta.named_parameters() if p.requires_grad] == ["spp_alpha.default"]
    no_beta.set_trainable(False)
    no_beta.set_trainable(True)  # β stays frozen when use_beta is False
    assert [n for n, p in no_beta.named_parameters() if p.requires_grad] == ["spp_alpha.default"]


@pytest.mark.parametrize("impl", IMPLS)
def test_conv1d_fan_in_fan_out(impl):
    torch.manual_seed(0)
    conv = Conv1D(24, 16).double()  # GPT-2 layout: weight is (in, out)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.5] = 0.0
    layer = spp(conv, torch.float64, r=4, impl=impl)
    random_factors(layer)
    x = torch.randn(2, 16, dtype=torch.float64)
    ref = paper_reference(x, conv.weight.T, conv.bias, *factors(layer), 2.0)
    torch.testing.assert_close(layer(x), ref)


def test_merge_keeps_zeros_and_unmerge_restores():
    lin = sparse_linear(dtype=torch.float32)
    original = lin.weight.detach().clone()
    layer = spp(lin, r=4)
    random_factors(layer)
    x = torch.randn(6, 32)
    y = layer(x)
    layer.merge()
    assert torch.equal(lin.weight == 0, original == 0)
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(lin.weight, original)  # bit for bit: the original is kept while merged


def test_merge_refuses_non_finite_factors_and_leaves_weights():
    lin = sparse_linear(dtype=torch.float32)
    original = lin.weight.detach().clone()
    layer = spp(lin, r=4)
    with torch.no_grad():
        factors(layer)[1][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge()
    assert torch.equal(lin.weight, original) and not layer.merged


def test_bfloat16_base_keeps_float32_factors():
    lin = sparse_linear(dtype=torch.bfloat16)
    layer = spp(lin, r=4)
    assert factors(layer)[0].dtype == torch.float32
    random_factors(layer)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = paper_reference(x.double(), lin.weight.double(), lin.bias.double(), *(p.double() for p in factors(layer)), 2.0)
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.1)
    y.float().sum().backward()
    assert factors(layer)[0].grad.dtype == torch.float32 and torch.isfinite(factors(layer)[0].grad).all()


def test_bad_r_names_valid_values():
    with pytest.raises(ValueError, match=r"r=5 does not divide out_features=48.*\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        spp(sparse_linear(), r=5)


def test_unwrappable_module_is_refused():
    with pytest.raises(TypeError, match="Embedding"):
        SPPLinear(nn.Embedding(10, 4))


@pytest.mark.parametrize("chunk_bytes", [256, 2048, 1 << 30])  # sub-block chunks, multi-block chunks, one chunk
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("sliced", [False, True])  # factor gradients reduced per chunk, or in row slices
def test_fused_chunking_is_exact(monkeypatch, chunk_bytes, dropout, sliced):
    import spp_hf.adapters.chunked as chunked
    import spp_hf.adapters.spp as spp_mod

    monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(spp_mod, "SLICE_ABOVE_ELEMENTS", 0 if sliced else 1 << 22)
    lin = sparse_linear(m=96, n=16, bias=True)
    w = lin.weight.detach()
    alpha = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(96, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)

    def fused(x, a, b):
        torch.manual_seed(11)
        return _FusedSPP.apply(x, w, lin.bias.detach(), a, b, 2.0, dropout)

    if dropout == 0.0:
        torch.testing.assert_close(fused(x, alpha, beta), paper_reference(x, w, lin.bias.detach(), alpha, beta, 2.0))
    assert torch.autograd.gradcheck(fused, (x, alpha, beta))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("base", ["linear", "conv1d"])
@pytest.mark.parametrize("train_weight", [True, False])
def test_trainable_base_gets_the_formula_gradient(impl, base, train_weight):
    """A base weight / bias the user made trainable gets the gradient of Eq. 5 on every impl (fused falls
    back to naive while the weight trains), never a silent None."""
    if base == "linear":
        mod = sparse_linear(m=16, n=8)
    else:
        torch.manual_seed(0)
        mod = Conv1D(16, 8).double()  # weight stored (in, out)
        with torch.no_grad():
            mod.weight[torch.rand_like(mod.weight) < 0.5] = 0.0
    layer = spp(mod, torch.float64, r=4, scale=1.5, impl=impl)
    random_factors(layer)
    mod.weight.requires_grad_(train_weight)
    mod.bias.requires_grad_(True)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert mod.bias.grad is not None and (mod.weight.grad is not None) == train_weight
    w = (mod.weight if base == "linear" else mod.weight.T).detach().clone().requires_grad_()
    b = mod.bias.detach().clone().requires_grad_()
    alpha, beta = (p.detach().clone().requires_grad_() for p in factors(layer))
    x2 = x.detach().clone().requires_grad_()
    paper_reference(x2, w, b, alpha, beta, 1.5).pow(2).sum().backward()
    got = [x.grad, mod.bias.grad, *(p.grad for p in factors(layer))]
    want = [x2.grad, b.grad, alpha.grad, beta.grad]
    if train_weight:
        got.append(mod.weight.grad if base == "linear" else mod.weight.grad.T)
        want.append(w.grad)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # nothing to differentiate: the same output on every path
        torch.testing.assert_close(layer(x), paper_reference(x, w, b, alpha, beta, 1.5), rtol=1e-10, atol=1e-10)


def test_fused_function_refuses_a_trainable_weight():
    from spp_hf.adapters.spp import spp_fused

    lin = sparse_linear(m=16, n=8)
    alpha = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(16, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="freeze the base weight"):
        spp_fused(x, lin.weight, lin.bias, alpha, beta, 2.0)
    with torch.no_grad():
        y = spp_fused(x, lin.weight, lin.bias, alpha, beta, 2.0)
    torch.testing.assert_close(y, paper_reference(x, lin.weight, lin.bias, alpha, beta, 2.0))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_bf16_output_dtype_matches_base(impl, bias):
    lin = sparse_linear(dtype=torch.float32, bias=bias)
    layer = spp(lin, r=4, impl=impl)
    random_factors(layer)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, y = lin(x), layer(x)
    assert want.dtype == torch.bfloat16 and y.dtype == want.dtype
    ref = paper_reference(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double(),
                          *(p.double() for p in factors(layer)), 2.0)  # fmt: skip
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.2)
