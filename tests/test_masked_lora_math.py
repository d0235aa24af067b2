"""Masked LoRA math (spp_hf.adapters.masked_lora) against the formula written out plainly here:

    Y = X Wᵀ + b + s · Dropout(X) ((B A) ⊙ (W ≠ 0))ᵀ,   merged weight W + s · (B A) ⊙ (W ≠ 0).
"""

from __future__ import annotations

import math

import pytest
import torch

import spp_hf.adapters.chunked as chunked
from spp_hf.adapters.masked_lora import (
    _FusedMaskedLoRA,
    init_masked_lora,
    masked_lora_branch_naive,
    masked_lora_delta,
    masked_lora_forward_naive,
    masked_lora_fused,
    masked_lora_merged_weight,
)

SCALE = 2.0


def formula(x, w, b, a, bb, scale=SCALE, x_branch=None):
    """The masked-LoRA output, term by term, in float64."""
    x, w, a, bb = x.double(), w.double(), a.double(), bb.double()
    x_branch = x if x_branch is None else x_branch.double()
    update = (bb @ a) * (w != 0).double()
    y = x @ w.T + scale * (x_branch @ update.T)
    return y if b is None else y + b.double()


def sparse_weight(m=12, n=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    w[torch.rand(m, n, generator=gen) < 0.5] = 0
    return w.to(dtype)


def adapters(m=12, n=8, r=3, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(m, r, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return a, b


def conv1d_view(w):
    """The (out, in) view GPT-2's Conv1D passes: a transpose of an (in, out) tensor, not contiguous."""
    stored = w.t().contiguous()
    view = stored.t()
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_forward_and_grads_equal_formula(transposed, with_bias):
    w = sparse_weight()
    w = conv1d_view(w) if transposed else w
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True) if with_bias else None
    a, b = adapters()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    y = masked_lora_fused(x, w, bias, a, b, SCALE)
    ref = formula(x, w, bias, a, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    inputs = (x, a, b) + ((bias,) if with_bias else ())
    got = torch.autograd.grad(y, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, a, b: _FusedMaskedLoRA.apply(x, w, bias, a, b, SCALE, 0.0), (x, a, b))


def test_naive_equals_formula_and_gradchecks():
    w = sparse_weight()
    bias = torch.randn(12, dtype=torch.float64)
    a, b = adapters()
    x = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(masked_lora_forward_naive(x, w, bias, a, b, SCALE), formula(x, w, bias, a, b))
    torch.testing.assert_close(masked_lora_branch_naive(x, w, a, b), x @ ((b @ a) * (w != 0)).T)
    assert torch.autograd.gradcheck(lambda x, a, b: masked_lora_forward_naive(x, w, bias, a, b, SCALE), (x, a, b))


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_dropout_equals_formula_with_its_mask(transposed):
    p = 0.3
    w = sparse_weight()
    w = conv1d_view(w) if transposed else w
    bias = torch.randn(12, dtype=torch.float64)
    a, b = adapters()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)

    def fused(x, a, b):
        torch.manual_seed(5)  # the same dropout mask on every evaluation
        return _FusedMaskedLoRA.apply(x, w, bias, a, b, SCALE, p)

    torch.manual_seed(5)
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    assert 0 < keep.sum() < keep.numel()
    ref = formula(x, w, bias, a, b, x_branch=x * keep / (1 - p))
    torch.testing.assert_close(fused(x, a, b), ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(fused(x, a, b), formula(x, w, bias, a, b))
    assert torch.autograd.gradcheck(fused, (x, a, b))


@pytest.mark.parametrize("chunk_bytes", [8 * 8 * 2, 8 * 8 * 5, 1 << 30])  # 2 rows, 5 rows (ragged end), one chunk
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_chunking_is_exact(monkeypatch, chunk_bytes, dropout):
    monkeypatch.setattr(chunked, "CHUNK_BYTES", chunk_bytes)
    w = sparse_weight(m=13, n=8)
    bias = torch.randn(13, dtype=torch.float64)
    a, b = adapters(m=13, n=8)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def fused(x, a, b):
        torch.manual_seed(11)
        return _FusedMaskedLoRA.apply(x, w, bias, a, b, SCALE, dropout)

    if dropout == 0.0:
        torch.testing.assert_close(fused(x, a, b), formula(x, w, bias, a, b), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (x, a, b))


def test_chunking_uses_several_chunks(monkeypatch):
    """The knob is live: a small CHUNK_BYTES makes the fused forward build W_eff in several pieces."""
    from spp_hf.adapters import masked_lora

    monkeypatch.setattr(chunked, "CHUNK_BYTES", 8 * 8 * 5)
    assert list(masked_lora._row_chunks(13, 8, 8)) == [(0, 5), (5, 10), (10, 13)]


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_double_backward_equals_formula(dropout):
    """create_graph=True (a gradient penalty) differentiates through the fused backward."""
    w = conv1d_view(sparse_weight())
    bias = torch.randn(12, dtype=torch.float64)
    a, b = adapters()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)

    def fused(x, a, b):
        torch.manual_seed(7)
        return _FusedMaskedLoRA.apply(x, w, bias, a, b, SCALE, dropout)

    def reference(x, a, b):
        torch.manual_seed(7)
        if dropout == 0.0:
            return formula(x, w, bias, a, b)
        keep = torch.empty(x.reshape(-1, 8).shape, dtype=torch.bool).bernoulli_(1 - dropout).view(x.shape)
        return formula(x, w, bias, a, b, x_branch=x * keep / (1 - dropout))

    def penalty(f):
        (gx,) = torch.autograd.grad(f(x, a, b).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (x, a, b))

    for got, want in zip(penalty(fused), penalty(reference)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradgradcheck(fused, (x, a, b))


def test_merged_weight_keeps_exactly_the_zeros_of_w():
    w = sparse_weight(m=16, n=8, dtype=torch.float32)
    w[0, :4] = 0.0
    w[1, :4] = -0.0  # signed zeros stay as they are, bit for bit
    a, b = adapters(m=16, n=8, dtype=torch.float32)
    a = a.detach().clone()
    a[0, 0] = float("inf")  # B A is Inf/NaN in column 0; where W is zero that must not leak in
    merged = masked_lora_merged_weight(w, a, b.detach(), SCALE)
    assert merged.dtype == torch.float32
    zeros = w == 0
    assert torch.equal(merged[zeros].view(torch.int32), w[zeros].view(torch.int32))
    expected = w.double() + SCALE * (b.detach().double() @ a.double())
    fin = ~zeros & torch.isfinite(expected)
    torch.testing.assert_close(merged[fin].double(), expected[fin], rtol=1e-5, atol=1e-5)


def test_merged_weight_equals_w_plus_scaled_masked_delta():
    w = sparse_weight(dtype=torch.bfloat16)
    a, b = adapters(dtype=torch.float32)
    merged = masked_lora_merged_weight(w, a.detach(), b.detach(), SCALE)
    assert merged.dtype == torch.float32
    expected = w.float() + SCALE * ((b @ a) * (w != 0)).detach()
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged == 0, w == 0)


def test_delta_is_masked_and_at_least_float32():
    w = sparse_weight(dtype=torch.float16)
    a, b = adapters(dtype=torch.bfloat16)
    delta = masked_lora_delta(w, a, b)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta, (b.float() @ a.float()) * (w != 0).float())
    assert masked_lora_delta(w, a.double(), b).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_and_input_with_float32_adapters(dtype):
    w = sparse_weight(m=32, n=16, dtype=dtype)
    bias = torch.randn(32, dtype=torch.float64).to(dtype)
    a, b = adapters(m=32, n=16, r=4, dtype=torch.float32)
    x = torch.randn(5, 16, dtype=torch.float64).to(dtype).requires_grad_()
    y = masked_lora_fused(x, w, bias, a, b, SCALE)
    assert y.dtype == dtype
    ref = formula(x, w, bias, a, b)
    torch.testing.assert_close(y.double(), ref, rtol=0.03, atol=0.1)
    grad = torch.randn(5, 32, dtype=torch.float64)
    y.backward(grad.to(dtype))
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    formula(xd, w, bias, ad, bd).backward(grad)
    assert a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    for got, want in ((a.grad, ad.grad), (b.grad, bd.grad), (x.grad, xd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.2)


def test_autocast_bf16_with_float32_input():
    w = sparse_weight(m=32, n=16, dtype=torch.float32)
    a, b = adapters(m=32, n=16, r=4, dtype=torch.float32)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_lora_fused(x, w, None, a, b, SCALE)
    assert y.dtype == torch.bfloat16
    grad = torch.randn(5, 32).bfloat16()
    y.backward(grad)  # grad_out reaches the function in bf16 while x is fp32
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = formula(xd, w, None, ad, bd)
    torch.testing.assert_close(y.double(), ref, rtol=0.03, atol=0.1)
    ref.backward(grad.double())
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == torch.float32
    for got, want in ((a.grad, ad.grad), (b.grad, bd.grad), (x.grad, xd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)  # backward runs in fp32


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forward_without_autograd(mode):
    w = sparse_weight(m=16, n=8, dtype=torch.float32)
    bias = torch.randn(16)
    a, b = adapters(m=16, n=8, dtype=torch.float32)
    x = torch.randn(3, 8)
    with mode():
        y = masked_lora_fused(x, w, bias, a, b, SCALE)
    torch.testing.assert_close(y.double(), formula(x, w, bias, a, b), rtol=1e-5, atol=1e-5)


def test_init_is_lora_init_and_starts_at_the_base():
    torch.manual_seed(0)
    a, b = init_masked_lora(4, 64, 32)
    assert a.shape == (4, 64) and b.shape == (32, 4) and a.dtype == b.dtype == torch.float32
    assert torch.equal(b, torch.zeros(32, 4))
    bound = 1 / math.sqrt(64)  # kaiming-uniform, a=√5: U(-1/√fan_in, 1/√fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    w = sparse_weight(m=32, n=64, dtype=torch.float32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(masked_lora_fused(x, w, None, a, b, SCALE), x @ w.T)
    with pytest.raises(ValueError, match="positive integer"):
        init_masked_lora(0, 64, 32)


def test_bad_shapes_and_trainable_weight_are_refused():
    w = sparse_weight()
    a, b = adapters()
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lora_A of shape \(r, in_features=8\)"):
        masked_lora_fused(x, w, None, a.t(), b, SCALE)
    with pytest.raises(ValueError, match="freeze the base weight"):
        masked_lora_fused(x, w.clone().requires_grad_(), None, a, b, SCALE)


def test_training_step_after_inference_mode_reuses_no_inference_buffer():
    """Buffers reused across calls must not leak from inference_mode into a training step."""
    w = sparse_weight(m=16, n=8, dtype=torch.float32)
    a, b = adapters(m=16, n=8, dtype=torch.float32)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        masked_lora_fused(x, w, None, a, b, SCALE)
    y = masked_lora_fused(x, w, None, a, b, SCALE)
    y.sum().backward()
    ad, bd = (t.detach().double().requires_grad_() for t in (a, b))
    formula(x, w, None, ad, bd).sum().backward()
    torch.testing.assert_close(a.grad.double(), ad.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), bd.grad, rtol=1e-5, atol=1e-5)


def masked_lora_layer(lin, r=3, lora_alpha=6.0, seed=2):
    """An SPPLinear holding one masked-LoRA adapter with random A and B in lin's dtype."""
    from spp_hf import MaskedLoRAConfig, SPPLinear

    dtype = str(lin.weight.dtype).removeprefix("torch.")
    layer = SPPLinear(lin, "default", MaskedLoRAConfig(r=r, lora_alpha=lora_alpha, adapter_dtype=dtype))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A["default"], layer.lora_B["default"]):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return layer


def sparse_module(kind, m=12, n=8, dtype=torch.float64):
    """nn.Linear or GPT-2 Conv1D (weight stored (in, out)) holding sparse_weight, with a random bias."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    mod = nn.Linear(n, m, dtype=dtype) if kind == "linear" else Conv1D(m, n).to(dtype)
    with torch.no_grad():
        w = sparse_weight(m, n, dtype)
        mod.weight.copy_(w if kind == "linear" else w.t())
        mod.bias.copy_(torch.randn(m, dtype=torch.float64))
    return mod


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("train_weight", [True, False])
def test_layer_trainable_base_gets_the_formula_gradient(kind, train_weight):
    """A base weight / bias the user made trainable gets the gradient of the formula (the layer takes the
    naive path while the weight trains), never a silent None or an error."""
    mod = sparse_module(kind)
    layer = masked_lora_layer(mod)
    mod.weight.requires_grad_(train_weight)
    mod.bias.requires_grad_(True)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert mod.bias.grad is not None and (mod.weight.grad is not None) == train_weight
    dense = mod.weight if kind == "linear" else mod.weight.t()
    w, bias = dense.detach().clone().requires_grad_(), mod.bias.detach().clone().requires_grad_()
    a, b = (layer.adapter_parameters()[k].detach().clone().requires_grad_() for k in ("lora_A", "lora_B"))
    x2 = x.detach().clone().requires_grad_()
    formula(x2, w, bias, a, b, scale=2.0).pow(2).sum().backward()
    got = [x.grad, mod.bias.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad]
    want = [x2.grad, bias.grad, a.grad, b.grad]
    if train_weight:
        got.append(mod.weight.grad if kind == "linear" else mod.weight.grad.t())
        want.append(w.grad)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # nothing to differentiate: the fused path, the same output
        torch.testing.assert_close(layer(x), formula(x, w, bias, a, b, scale=2.0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_autocast_bf16_with_bias_returns_what_the_base_returns(dropout):
    """Qwen2 q/k/v: fp32 weights with a bias under CPU autocast bf16 give bf16, as the base layer does."""
    lin = sparse_module("linear", m=32, n=16, dtype=torch.float32)
    a, b = adapters(m=32, n=16, r=4, dtype=torch.float32)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = lin(x)
        y = masked_lora_fused(x, lin.weight.detach(), lin.bias, a, b, SCALE, dropout)
        y_layer = masked_lora_layer(sparse_module("linear", m=32, n=16, dtype=torch.float32))(x)
    assert want.dtype == torch.bfloat16 and y.dtype == want.dtype and y_layer.dtype == want.dtype
    y.float().sum().backward()
    assert lin.bias.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    if dropout == 0.0:
        ref = formula(x, lin.weight, lin.bias, a, b)
        torch.testing.assert_close(y.double(), ref, rtol=0.03, atol=0.1)
        ad, bd = (t.detach().double().requires_grad_() for t in (a, b))
        formula(x, lin.weight, lin.bias, ad, bd).sum().backward()
        for got, ref_grad in ((a.grad, ad.grad), (b.grad, bd.grad)):
            torch.testing.assert_close(got.double(), ref_grad, rtol=1e-4, atol=1e-4)  # backward runs in fp32
