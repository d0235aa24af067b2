"""spp_hf.artifacts: permissions, kept entries, recovery, readable errors, model folders with sparsity.json."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
import torch
from conftest import make_tiny_model, prune_magnitude_nm_

from spp_hf import artifacts
from spp_hf.artifacts import (
    CONFIG_NAME,
    SPARSITY_NAME,
    WEIGHTS_NAME,
    atomic_dir,
    model_sparsity_record,
    read_adapter_files,
    read_sparsity_json,
    recover_dir,
    write_adapter_folder,
    write_adapters,
    write_model_folder,
)
from spp_hf.sparsity import fingerprint_modules, iter_linear_weights, zero_mask_differences


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_normal_permissions_without_touching_the_umask(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "umask", lambda *a: calls.append(a) or 0o022)
    folder = write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)}, "card")
    assert calls == []  # os.umask is process-wide: reading it races with other threads
    assert mode(folder) == 0o755
    assert {mode(folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME, "README.md")} == {0o644}
    artifacts.write_json(tmp_path / "x.json", {"a": 1})
    assert mode(tmp_path / "x.json") == 0o644


def test_adapter_round_trip_and_kept_entries(tmp_path):
    folder = tmp_path / "out"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_text("opt")
    tensors = {"x": torch.arange(6.0).reshape(2, 3)}
    write_adapters(folder, {"": artifacts.AdapterFiles({"r": 2}, tensors, "root", {"spp_adapter": "a"}),
                            "b": artifacts.AdapterFiles({"r": 3}, tensors)})  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), "pt") as handle:
        assert handle.metadata()["spp_adapter"] == "a" and handle.metadata()["format"] == "pt"
    config, loaded = read_adapter_files(folder)
    assert config == {"r": 2} and torch.equal(loaded["x"], tensors["x"])
    assert read_adapter_files(folder / "b")[0] == {"r": 3}
    write_adapter_folder(folder, {"r": 5}, tensors)
    assert not (folder / "README.md").exists()  # the replaced adapter's card does not describe the new one
    assert (folder / "checkpoint-2" / "optimizer.pt").read_text() == "opt"  # a Trainer's checkpoints survive
    assert read_adapter_files(folder / "b")[0] == {"r": 3}  # another adapter's sub-folder too
    assert read_adapter_files(folder)[0] == {"r": 5}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", ".hidden"])
def test_adapter_subfolder_names_stay_inside(tmp_path, name):
    with pytest.raises(ValueError, match="plain folder name"):
        write_adapters(tmp_path / "out", {"": artifacts.AdapterFiles({}, {}), name: artifacts.AdapterFiles({}, {})})
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_read_errors_name_the_file_and_fix(tmp_path):
    folder = write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)})
    (folder / CONFIG_NAME).write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"spp_config.json is not UTF-8 text.*save or download it again"):
        read_adapter_files(folder)
    (folder / CONFIG_NAME).write_text("{}")
    (folder / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        read_adapter_files(folder)
    with pytest.raises(FileNotFoundError, match="not an SPP adapter"):
        read_adapter_files(tmp_path)


def test_recover_dir_puts_an_interrupted_replacement_back(tmp_path):
    old = write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)})
    os.rename(old, tmp_path / ".a.old")  # a kill between the two renames of the rename-aside path
    assert read_adapter_files(tmp_path / "a")[0] == {"r": 1}
    (tmp_path / ".a.old").mkdir()  # both present: the swap completed, the aside is garbage
    recover_dir(tmp_path / "a")
    assert not (tmp_path / ".a.old").exists()


def test_failed_block_leaves_the_old_folder(tmp_path):
    write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)})
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a") as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("boom")
    assert read_adapter_files(tmp_path / "a")[0] == {"r": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "f").write_text("x")
    if not artifacts.exchange(tmp_path / "x", tmp_path / "y"):
        pytest.skip("this file system cannot exchange")
    assert (tmp_path / "y" / "f").read_text() == "x" and not (tmp_path / "x" / "f").exists()


def test_model_folder_has_sparsity_json_and_card(tmp_path):
    model = make_tiny_model("llama")
    prune_magnitude_nm_(model)
    base = fingerprint_modules(iter_linear_weights(model))
    record = model_sparsity_record(model, "merged", base_mask_fingerprint=base, adapter="x")
    out = write_model_folder(model, None, tmp_path / "m", "the card", record)
    data = read_sparsity_json(out)
    assert data["kind"] == "merged" and data["adapter"] == "x" and data["pattern"] == "2:4"
    assert zero_mask_differences(data["base_mask_fingerprint"], data["mask_fingerprint"]) == []
    assert (out / "README.md").read_text() == "the card" and (out / "config.json").is_file()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)  # fills the zeros
        model.model.layers[1].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"lost its base's zero mask in 2 layers.*nothing was written"):
        model_sparsity_record(model, "merged", base_mask_fingerprint=base)
    assert json.loads((out / SPARSITY_NAME).read_text())["adapter"] == "x"


def test_zero_mask_differences_lists_every_module():
    a = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    ref = fingerprint_modules([("m1", a), ("m2", a), ("m3", a), ("m4", a)])
    found = fingerprint_modules([("m1", a), ("m2", b), ("m3", torch.zeros(3, 2)), ("extra", b)])
    assert zero_mask_differences(ref, found) == [
        "m2: zero mask differs (1 zeros, expected 2)", "m3: shape [3, 2] != [2, 2]", "m4: missing",
    ]  # fmt: skip
    assert zero_mask_differences(ref, ref) == []


def test_concurrent_threads_keep_their_modes(tmp_path):
    """Writers in threads: every file ends 0644 (no umask juggling that another thread could observe)."""
    threads = [threading.Thread(target=artifacts.write_json, args=(tmp_path / f"{i}.json", {"i": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {mode(p) for p in tmp_path.iterdir()} == {0o644}
