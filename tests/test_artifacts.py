"""spp_hf.storage: permissions, kept entries, recovery, readable errors, model folders with sparsity.json."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, prune_magnitude_nm_

from spp_hf import storage
from spp_hf.sparsity import fingerprint_modules, iter_linear_weights, model_sparsity_record, zero_mask_differences
from spp_hf.storage import (
    CONFIG_NAME,
    SPARSITY_NAME,
    WEIGHTS_NAME,
    atomic_dir,
    read_adapter_files,
    read_sparsity_json,
    write_adapter_folder,
    write_adapters,
    write_model_folder,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


SPP_CARD = "---\nlibrary_name: spp-hf\ntags:\n- spp-adapter\n---\n# an adapter card\n"


def plain_modes(tmp_path) -> tuple[int, int]:
    """The modes a plain mkdir / new file get here (what the umask gives): the reference for new storage."""
    os.mkdir(tmp_path / "ref-dir")
    (tmp_path / "ref-file").write_text("x")
    modes = mode(tmp_path / "ref-dir"), mode(tmp_path / "ref-file")
    os.rmdir(tmp_path / "ref-dir")
    os.unlink(tmp_path / "ref-file")
    return modes


def test_new_artifacts_get_the_umask_modes_without_touching_the_umask(tmp_path, monkeypatch):
    dir_mode, file_mode = plain_modes(tmp_path)
    calls = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda *a: calls.append(a) or real_umask(*a))
    folder = write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)}, "card")
    assert calls == []  # os.umask is process-wide: reading it races with other threads
    assert mode(folder) == dir_mode
    assert {mode(folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME, "README.md")} == {file_mode}
    storage.write_json(tmp_path / "x.json", {"a": 1})
    assert mode(tmp_path / "x.json") == file_mode


@pytest.mark.parametrize("folder_mode", [0o700, 0o2775, 0o750])
def test_saving_into_a_folder_keeps_its_mode_and_its_files_modes(tmp_path, folder_mode):
    """Review item 8: swaps forced 0755/0644, making a private folder world-readable."""
    folder = write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)}, SPP_CARD)
    os.chmod(folder, folder_mode)
    os.chmod(folder / CONFIG_NAME, 0o600)
    write_adapter_folder(folder, {"r": 2}, {"w": torch.ones(2)}, SPP_CARD)
    assert mode(folder) == folder_mode and mode(folder / CONFIG_NAME) == 0o600
    storage.write_json(tmp_path / "x.json", {"a": 1})
    os.chmod(tmp_path / "x.json", 0o640)
    storage.write_json(tmp_path / "x.json", {"a": 2})
    assert mode(tmp_path / "x.json") == 0o640


def test_saving_into_a_clone_keeps_hidden_entries_and_user_files(tmp_path):
    """Review item 1: the swap carried the old folder's entries over but skipped every name starting with '.'."""
    folder = tmp_path / "clone"
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "objects" / "ab").write_bytes(b"blob")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "upload.lock").write_text("l")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / ".env").write_text("HF_TOKEN=secret\n")
    (folder / "notes.md").write_text("mine")
    os.symlink("notes.md", folder / "link")
    for card in (SPP_CARD, None):
        write_adapter_folder(folder, {"r": 1}, {"w": torch.ones(2)}, card)
        assert (folder / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
        assert (folder / ".git" / "objects" / "ab").read_bytes() == b"blob"
        assert (folder / ".cache" / "huggingface" / "upload.lock").read_text() == "l"
        assert (folder / ".gitattributes").is_file() and (folder / ".env").read_text() == "HF_TOKEN=secret\n"
        assert (folder / "notes.md").read_text() == "mine" and os.readlink(folder / "link") == "notes.md"
    assert not (folder / "README.md").exists()  # spp-hf's own card of the replaced adapter went with it


def test_a_user_readme_is_kept_when_the_save_writes_no_card(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "README.md").write_text("# my project\n")
    write_adapter_folder(folder, {"r": 1}, {"w": torch.ones(2)})
    assert (folder / "README.md").read_text() == "# my project\n"


def test_a_symlinked_output_folder_stays_a_link_to_the_new_folder(tmp_path):
    """Review item 10: `out -> /scratch/x` was refused as 'exists and is not a folder'."""
    real = tmp_path / "scratch" / "x"
    real.mkdir(parents=True)
    (real / "keep.txt").write_text("k")
    os.symlink(real, tmp_path / "out")
    for r in (1, 2):
        write_adapter_folder(tmp_path / "out", {"r": r}, {"w": torch.ones(2)})
        assert (tmp_path / "out").is_symlink() and read_adapter_files(tmp_path / "out")[0] == {"r": r}
        assert (real / "keep.txt").read_text() == "k" and read_adapter_files(real)[0] == {"r": r}


def test_saving_into_the_working_directory(tmp_path, monkeypatch):
    """Review item 11: save_pretrained(".") failed with a raw OSError [Errno 16]."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "data.txt").write_text("d")
    monkeypatch.chdir(folder)
    for r in (1, 2):
        write_adapter_folder(".", {"r": r}, {"w": torch.ones(2)})
        assert read_adapter_files(".")[0] == {"r": r}
        assert Path("data.txt").read_text() == "d"  # the working directory is the new folder, not a deleted one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_adapter_round_trip_and_kept_entries(tmp_path):
    folder = tmp_path / "out"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_text("opt")
    tensors = {"x": torch.arange(6.0).reshape(2, 3)}
    write_adapters(folder, {"": storage.AdapterFiles({"r": 2}, tensors, SPP_CARD, {"spp_adapter": "a"}),
                            "b": storage.AdapterFiles({"r": 3}, tensors)})  # fmt: skip
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
        write_adapters(tmp_path / "out", {"": storage.AdapterFiles({}, {}), name: storage.AdapterFiles({}, {})})
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


def test_readers_never_touch_a_users_dot_old_folder(tmp_path):
    """Review item 7: every reader deleted a sibling `.<name>.old` (or renamed it into place): the user's backup."""
    backup = write_adapter_folder(tmp_path / ".a.old", {"r": 0}, {"w": torch.zeros(2)})
    write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)})
    read_adapter_files(tmp_path / "a")
    read_sparsity_json(tmp_path / "a")
    write_adapter_folder(tmp_path / "a", {"r": 2}, {"w": torch.ones(2)})
    assert read_adapter_files(backup)[0] == {"r": 0}
    (tmp_path / "b").mkdir()
    write_adapter_folder(tmp_path / ".b.old", {"r": 0}, {"w": torch.zeros(2)})
    import shutil

    shutil.rmtree(tmp_path / "b")  # `b` missing: the old code renamed the user's `.b.old` into its place
    with pytest.raises(FileNotFoundError):
        read_adapter_files(tmp_path / "b")
    assert read_adapter_files(tmp_path / ".b.old")[0] == {"r": 0} and not (tmp_path / "b").exists()


def test_an_interrupted_rename_aside_is_read_in_place_and_put_back_by_the_next_writer(tmp_path):
    old = write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)})
    aside = tmp_path / ".a.spp-hf-old-0123456789ab"
    os.rename(old, aside)  # what a kill between the two renames of the rename-aside path leaves
    assert read_adapter_files(tmp_path / "a")[0] == {"r": 1}
    assert aside.is_dir() and not (tmp_path / "a").exists()  # the reader moved nothing
    write_adapter_folder(tmp_path / "a", {"r": 2}, {"w": torch.ones(2)})
    assert read_adapter_files(tmp_path / "a")[0] == {"r": 2} and not aside.exists()


def _forked(work) -> int:
    """Run `work()` in a forked child; its exit code (0 when it returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_a_killed_writers_staging_folder_is_removed_by_the_next_writer(tmp_path):
    """Review item 12: `.<name>.staging-*` (a whole model copy for merged models) stayed forever."""
    write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)})

    def killed_writer():  # a writer killed after it filled its staging folder
        with atomic_dir(tmp_path / "a") as staging:
            (staging / "big.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), 9)

    os.waitpid(_forked(killed_writer), 0)
    assert len(list(tmp_path.iterdir())) == 2
    write_adapter_folder(tmp_path / "a", {"r": 2}, {"w": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_two_live_writers_of_one_file_never_remove_each_others_temp_files(tmp_path):
    """Two `spp-hf run` processes on one config (one method each) both write its config.json: one crashed with
    FileNotFoundError on its temp file, because every writer removed all temp files beside the target, a live
    writer's included. Only a dead writer's temp files are leftovers."""
    target = tmp_path / "config.json"

    def writer(i: int):
        return lambda: [storage.atomic_write_text(target, f"{i} {n}") for n in range(300)]

    pids = [_forked(writer(i)) for i in range(2)]
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids] == [0, 0]
    assert target.read_text().split()[1] == "299"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_live_writers_staging_folder_is_left_alone(tmp_path):
    """A folder writer in another live process keeps its staging folder; once that process is gone, the next
    writer removes it."""
    write_adapter_folder(tmp_path / "a", {"r": 1}, {"w": torch.ones(2)})
    ready, done = os.pipe(), os.pipe()

    def slow_writer():
        with atomic_dir(tmp_path / "a") as staging:
            (staging / "big.bin").write_bytes(b"x" * 1000)
            os.write(ready[1], b"1")
            os.read(done[0], 1)

    pid = _forked(slow_writer)
    try:
        os.read(ready[0], 1)
        write_adapter_folder(tmp_path / "a", {"r": 2}, {"w": torch.ones(2)})
        staging = [p for p in tmp_path.iterdir() if ".spp-hf-staging-" in p.name]
        assert len(staging) == 1 and (staging[0] / "big.bin").is_file()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    write_adapter_folder(tmp_path / "a", {"r": 3}, {"w": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert read_adapter_files(tmp_path / "a")[0] == {"r": 3}


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
    if not storage.exchange(tmp_path / "x", tmp_path / "y"):
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
    threads = [threading.Thread(target=storage.write_json, args=(tmp_path / f"{i}.json", {"i": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {mode(p) for p in tmp_path.iterdir()} == {0o644}
