"""The real SmolLM2-135M, magnitude-pruned 2:4: inject SPP, train a few steps, save, reload, merge."""

from __future__ import annotations

import pytest
import torch
from conftest import prune_magnitude_nm_
from transformers import AutoModelForCausalLM, AutoTokenizer

from spp_hf import SPPConfig, SPPModel, get_spp_model, sparsity_report
from spp_hf.sparsity import iter_linear_weights

pytestmark = pytest.mark.slow


def test_smollm2_spp_round_trip(smollm2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prune_magnitude_nm_(base)
    report = sparsity_report(base)
    assert report.pattern == "2:4" and len(report.layers) == 30 * 7
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base_masks = {n: (w == 0).clone() for n, w in iter_linear_weights(base)}

    text = ["The capital of France is Paris. The capital of Italy is Rome.", "Sparse models keep their zeros."]
    batch = tok(text, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    model = get_spp_model(AutoModelForCausalLM.from_pretrained(base_dir), SPPConfig(r=16, scale=2.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    losses = []
    model.train()
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the SPP factors learn
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    size = (tmp_path / "adapter" / "spp_adapter.safetensors").stat().st_size
    assert size < 12e6  # α/β only (~2.6M float32 values), never the 135M base

    merged = SPPModel.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    torch.testing.assert_close(merged_logits, logits, rtol=1e-3, atol=1e-3)
    after = {n: (w == 0) for n, w in iter_linear_weights(merged)}
    assert after.keys() == base_masks.keys()
    assert all(torch.equal(after[n], base_masks[n]) for n in base_masks)
