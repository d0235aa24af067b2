"""Saves killed at every file-system step (and at random moments) leave the old or the new artifact, never a mix.

A forked child saves a new version over an old one and SIGKILLs itself at its n-th file-system call
(rename, replace, exchange, fsync, chmod, remove), for n = 1, 2, ... until a save completes; after
each kill the parent reads the folder with the public readers and must find one complete version.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from spp_hf import storage
from spp_hf.sparsity import model_sparsity_record
from spp_hf.storage import (
    CONFIG_NAME,
    read_adapter_files,
    read_sparsity_json,
    write_adapter_folder,
    write_model_folder,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")]


def version(n: int) -> tuple[dict, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(n)
    return {"r": 4, "version": n}, {"a": torch.randn(4, 8, generator=g), "b": torch.randn(8, generator=g)}


def which_adapter(folder: Path, versions: list[int]) -> int | None:
    """The version a complete adapter folder holds; None if there is no folder; fails on anything else."""
    if not storage.readable_folder(folder).exists():
        return None
    config, tensors = read_adapter_files(folder)
    for n in versions:
        want_config, want_tensors = version(n)
        if config == want_config:
            assert tensors.keys() == want_tensors.keys()
            assert all(torch.equal(tensors[k], want_tensors[k]) for k in tensors), "weights of another save"
            return n
    raise AssertionError(f"unknown config {config}")


def kill_at(n: int, exchange: bool) -> None:
    """In a forked child: SIGKILL this process at its n-th file-system call."""
    count = [0]

    def counted(function):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapper

    for name in ("rename", "replace", "fsync", "chmod", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))
    storage.exchange = counted(storage.exchange if exchange else (lambda a, b: False))


def run_child(work, n: int, exchange: bool) -> bool:
    """Run `work` in a child killed at step n; True if it finished (n was past its last step)."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            kill_at(n, exchange)
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return False
    assert os.WEXITSTATUS(status) == 0
    return True


def add_user_content(folder: Path) -> None:
    """What a user keeps in a folder spp-hf saves into: a git clone's history, a dot-file, notes, a mode."""
    (folder / ".git" / "refs").mkdir(parents=True, exist_ok=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "notes.md").write_text("mine")
    os.chmod(folder, 0o750)


def assert_user_content(folder: Path, n: int) -> None:
    folder = storage.readable_folder(folder)
    assert (folder / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n", f"killed at step {n}: .git lost"
    assert (folder / ".gitattributes").is_file() and (folder / "notes.md").read_text() == "mine", f"step {n}"
    assert oct(os.stat(folder).st_mode)[-3:] == "750", f"killed at step {n}: the folder's mode changed"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
@pytest.mark.parametrize("existing", ["replace", "create", "user-folder", "symlinked-user-folder"])
def test_adapter_save_killed_at_every_step(tmp_path, exchange, existing):
    """Every kill leaves the old or the new adapter, and a user's folder keeps its content and mode throughout."""
    import shutil

    real = tmp_path / "real" / "adapter"
    folder = tmp_path / "adapter" if existing != "symlinked-user-folder" else tmp_path / "link"
    if existing == "symlinked-user-folder":
        real.parent.mkdir()
        os.symlink(real, folder)
    user = existing in ("user-folder", "symlinked-user-folder")
    if exchange and not storage.exchange(tmp_path, tmp_path):
        pytest.skip("this file system cannot exchange")
    seen = set()
    for n in range(1, 200):
        for path in (tmp_path / "adapter", real):
            if path.exists() and not path.is_symlink():
                shutil.rmtree(path)
        if existing != "create":
            write_adapter_folder(folder, *version(1), "card 1")
        if user:
            add_user_content(storage.resolve_target(folder))
        finished = run_child(lambda: write_adapter_folder(folder, *version(2), "card 2"), n, exchange)
        found = which_adapter(folder, [1, 2])
        if user:
            assert_user_content(folder, n)
            assert folder.is_symlink() == (existing == "symlinked-user-folder")
        seen.add(found)
        assert found == 2 if finished else found in ({1, 2} if existing != "create" else {None, 2})
        if existing != "create":
            assert found is not None, f"killed at step {n}: neither the old nor the new adapter"
        if finished:
            break
    else:
        pytest.fail("the save never finished")
    assert n > 5, "too few steps observed: the instrumentation is not reaching the writer"
    assert seen == ({1, 2} if existing != "create" else {None, 2}), seen  # both outcomes occurred: the kills hit real windows


def test_model_folder_save_killed_at_every_step(tmp_path):
    folder = tmp_path / "merged"
    models = [make_tiny_model("llama", seed=s) for s in (0, 1)]
    records = [model_sparsity_record(m, "merged") for m in models]
    write_model_folder(models[0], None, folder, "card 0", records[0])
    add_user_content(folder)
    seen = set()
    for n in range(1, 400):
        finished = run_child(lambda: write_model_folder(models[1], None, folder, "card 1", records[1]), n, True)
        assert_user_content(folder, n)
        assert read_sparsity_json(folder)["kind"] == "merged"
        index = int((folder / "README.md").read_text().split()[-1])
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        for (name, p), q in zip(loaded.state_dict().items(), models[index].state_dict().values()):
            assert torch.equal(p, q), f"killed at step {n}: {name} does not belong to the save its sparsity.json names"
        seen.add(index)
        if finished:
            assert index == 1
            break
        if index == 1:  # already swapped: restore the old folder for the next kill point
            write_model_folder(models[0], None, folder, "card 0", records[0])
    assert seen == {0, 1}


def test_json_overwrite_killed_at_every_step(tmp_path):
    path = tmp_path / "eval.json"
    storage.write_json(path, {"v": 1})
    for n in range(1, 50):
        finished = run_child(lambda: storage.write_json(path, {"v": 2}), n, True)
        assert storage.read_sparsity_json(path) in ({"v": 1}, {"v": 2}) and oct(os.stat(path).st_mode)[-3:] == "644"
        if finished:
            assert storage.read_sparsity_json(path) == {"v": 2}
            break
        storage.write_json(path, {"v": 1})
    assert n > 3


def test_adapter_save_killed_at_random_moments(tmp_path):
    """A child saving versions 1, 2, 3, ... in a loop, killed after a random delay, 25 times."""
    folder = tmp_path / "adapter"
    write_adapter_folder(folder, *version(0))
    rng = random.Random(0)
    start = 1
    for _ in range(25):
        pid = os.fork()
        if pid == 0:
            try:
                for n in range(start, start + 10_000):
                    write_adapter_folder(folder, *version(n))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        config, _ = read_adapter_files(folder)
        found = which_adapter(folder, [config["version"]])
        assert found is not None and found >= start - 1
        start = found + 1


def test_config_and_weights_from_two_saves_are_refused(tmp_path):
    """A folder written in place (a Trainer checkpoint) and interrupted between its files is detected."""
    folder = tmp_path / "checkpoint"
    storage.write_adapter_files_in_place(folder, *version(1))
    old_config = (folder / CONFIG_NAME).read_bytes()
    storage.write_adapter_files_in_place(folder, *version(2))
    (folder / CONFIG_NAME).write_bytes(old_config)  # what a kill between the weights and the config leaves
    with pytest.raises(ValueError, match="two different saves"):
        read_adapter_files(folder)
