"""Masked full fine-tuning keeps the pruning mask exactly, through AdamW (weight decay, moments) and SGD momentum."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, prune_magnitude_nm_

from spp_hf.training.masked_full import KeepZerosCallback, MaskKeeper
from spp_hf.sparsity import iter_linear_weights

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pruned():
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    zeros = {n: (w == 0).clone() for n, w in iter_linear_weights(model)}
    assert all(z.float().mean() >= 0.5 for z in zeros.values())
    return model, zeros


def _train(model, optimizer, keeper: MaskKeeper | None, steps: int = 6, reapply: bool = True) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if keeper is not None and reapply:
            keeper.reapply()


def _optimizers():
    return {
        "adamw_decay": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.1),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_zeros_stay_exact_and_every_other_weight_trains(name):
    model, zeros = _pruned()
    before = {n: w.detach().clone() for n, w in iter_linear_weights(model)}
    keeper = MaskKeeper(model, TARGETS)
    _train(model, _optimizers()[name]([p for p in model.parameters() if p.requires_grad]), keeper)
    for n, w in iter_linear_weights(model):
        assert torch.equal(w == 0, zeros[n]), n  # bit for bit: no new zeros, no filled ones
        assert (w[~zeros[n]] != before[n][~zeros[n]]).float().mean() > 0.9, n  # the non-zero weights moved


def test_gradient_hook_alone_keeps_zeros_through_adamw_decay_and_moments():
    """Without the re-application, the masked gradient alone keeps the zeros: Adam's moments stay zero and
    decoupled weight decay multiplies zero. (The callback is the second guarantee, not the only one.)"""
    model, zeros = _pruned()
    keeper = MaskKeeper(model, TARGETS)
    _train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1), keeper, reapply=False)
    assert all(torch.equal(w == 0, zeros[n]) for n, w in iter_linear_weights(model))


def test_without_the_mask_training_fills_the_zeros():
    """The control: the same training without MaskKeeper densifies the weights (so the tests above can fail)."""
    model, zeros = _pruned()
    for n, w in iter_linear_weights(model):
        w.requires_grad_(True)
    _train(model, torch.optim.AdamW([w for _, w in iter_linear_weights(model)], lr=1e-2, weight_decay=0.1), None)
    filled = {n: ((w != 0) & zeros[n]).sum().item() / zeros[n].sum().item() for n, w in iter_linear_weights(model)}
    assert min(filled.values()) > 0.9


def test_gradients_are_zero_where_pruned_and_only_targets_train():
    model, zeros = _pruned()
    keeper = MaskKeeper(model, ["q_proj", "down_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")}
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    for n, w in iter_linear_weights(model):
        if w.grad is not None:
            assert torch.all(w.grad[zeros[n]] == 0) and torch.any(w.grad[~zeros[n]] != 0), n
    assert keeper.trainable_parameters == sum(int((~zeros[n]).sum()) for n in keeper.weights)


def test_reapply_and_callback_restore_zeros_written_by_anything_else():
    model, zeros = _pruned()
    keeper = MaskKeeper(model, TARGETS)
    with torch.no_grad():
        for w in keeper.weights.values():
            w.add_(1.0)  # e.g. an optimizer that ignores gradients (or rounding)
    KeepZerosCallback(keeper).on_optimizer_step(None, None, None)
    assert all(torch.equal(w == 0, zeros[n]) for n, w in iter_linear_weights(model))


def test_targets_that_select_nothing_are_refused():
    model, _ = _pruned()
    with pytest.raises(ValueError, match="selected 0 modules"):
        MaskKeeper(model, ["not_a_layer"])
    assert all(p.requires_grad for p in model.parameters())  # validated before freezing anything
