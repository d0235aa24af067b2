"""`spp-hf inspect` on local folders of every kind spp-hf writes, and on ones whose zeros were tampered with."""

from __future__ import annotations

import torch
from conftest import make_tiny_model, prune_magnitude_nm_
from safetensors.torch import load_file, save_file

from spp_hf.sparsity import model_sparsity_record
from spp_hf.storage import read_sparsity_json, sparsity_fingerprint, write_model_folder
from spp_hf.hub.inspection import inspect_target

LAYER = "model.layers.0.mlp.down_proj"


def test_inspect_pruned_and_merged_folders(tmp_path):
    base = make_tiny_model("llama")
    prune_magnitude_nm_(base)
    pruned = write_model_folder(base, None, tmp_path / "pruned", "card", model_sparsity_record(base, "pruned-base"))
    result = inspect_target(str(pruned))
    assert result.kind == "pruned base" and result.ok and result.pattern == "2:4"
    assert [c for c, _, _ in result.checks] == ["weights match sparsity.json"]

    merged_model = make_tiny_model("llama")
    prune_magnitude_nm_(merged_model)  # the same zeros (seed 0) with other values: a merged fine-tune
    with torch.no_grad():
        for p in merged_model.parameters():
            p.mul_(1.5)
    base_fp = sparsity_fingerprint(read_sparsity_json(pruned))
    record = model_sparsity_record(merged_model, "merged", base_mask_fingerprint=base_fp, base_model=str(pruned))
    merged = write_model_folder(merged_model, None, tmp_path / "merged", "card", record)
    result = inspect_target(str(merged))
    assert result.kind == "merged model" and result.ok, str(result)
    assert "has the base's zeros" in [c for c, _, _ in result.checks]

    tensors = load_file(merged / "model.safetensors")
    key = f"{LAYER}.weight"
    tensors[key][tensors[key] == 0] = 1e-3  # fill the base's zeros of one layer
    save_file(tensors, merged / "model.safetensors", metadata={"format": "pt"})
    result = inspect_target(str(merged))
    assert not result.ok
    failed = {c: d for c, ok, d in result.checks if not ok}
    assert set(failed) == {"weights match sparsity.json", "has the base's zeros"}
    assert all(d.startswith(f"{LAYER}: zero mask differs") for d in failed.values())


def test_inspect_a_folder_without_sparsity_json_fails(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path / "plain")
    result = inspect_target(str(tmp_path / "plain"))
    assert not result.ok and "nothing to check the zeros against" in str(result)
