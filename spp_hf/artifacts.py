"""Everything spp-hf writes to disk: file names, durable atomic writes, adapter folders, model folders.

Durability. A file is written to a temp file beside its target, fsync'ed, given mode 0644 and renamed
onto the target, then the folder is fsync'ed so the rename itself survives a power loss. A folder is
written into a staging folder beside its target (every file and folder fsync'ed, mode 0755), then:

- target missing: the staging folder is renamed onto it (atomic), the parent fsync'ed;
- target present, on Linux: the two are swapped with `renameat2(RENAME_EXCHANGE)` (one atomic step:
  a reader sees the old folder or the new one, never neither), the parent fsync'ed, then the old
  folder (now under the staging name) removed;
- target present where the kernel or file system cannot exchange: the old folder is renamed aside to
  `.<name>.old`, the new one renamed into place, the aside removed. A crash between the two renames
  leaves only the aside; `recover_dir` (called by every reader here and before every write) renames it
  back. So a reader of spp-hf artifacts always finds the complete old or the complete new folder.

An adapter's config and weights live in one folder that is swapped as a whole, and the weights file
records the sha256 of the config bytes it was saved with (`spp_config_sha256` in the safetensors
metadata); `read_adapter_files` refuses a pair from two different saves (a folder written in place,
like a Trainer checkpoint, could otherwise mix them).

Modes are set with explicit `chmod` (0644 files, 0755 folders) instead of reading the umask, because
`os.umask` is process-wide and racy with other threads. One writer per target at a time is assumed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG_NAME = "spp_config.json"
WEIGHTS_NAME = "spp_adapter.safetensors"
SPARSITY_NAME = "sparsity.json"
README_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, README_NAME)
CONFIG_HASH_KEY = "spp_config_sha256"
SPARSITY_FORMAT_VERSION = 1
FILE_MODE = 0o644
DIR_MODE = 0o755
MODEL_KINDS = ("pruned-base", "spp-merged", "merged")


# --------------------------------------------------------------------------- fsync / rename primitives
def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under `root` (files first, then their folders, bottom-up)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                _fsync_file(path)
        fsync_dir(folder)


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`).

    False when this system or file system cannot exchange (the caller then renames aside).
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _aside(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def recover_dir(path: str | os.PathLike) -> Path:
    """Finish or undo a folder replacement that a crash interrupted; returns `path`.

    Only the rename-aside path can be interrupted between its steps: if `path` is missing and its
    aside `.<name>.old` exists, the aside (the complete old folder) is renamed back. If both exist,
    the new folder is in place and the aside is removed.
    """
    path = Path(path)
    aside = _aside(path)
    if aside.is_dir():
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, path)
            fsync_dir(path.parent)
    return path


def _replace_dir(staging: Path, path: Path) -> None:
    """Put the complete folder `staging` at `path` (see the module docstring for the steps)."""
    if not path.exists():
        os.rename(staging, path)
        fsync_dir(path.parent)
        return
    if not path.is_dir() or path.is_symlink():
        raise NotADirectoryError(f"{path} exists and is not a folder; remove it or choose another output folder.")
    if exchange(staging, path):
        fsync_dir(path.parent)
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = _aside(path)
    os.rename(path, aside)
    fsync_dir(path.parent)
    os.rename(staging, path)
    fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _link_missing(old: Path, new: Path) -> None:
    """Hard-link (copy where links fail) every entry of `old` that `new` lacks, so a swap keeps them.

    The adapter files themselves are never carried over: a save that writes no card must not keep
    the card of the adapter it replaces.
    """
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink() or entry.name.startswith(".") or entry.name in ADAPTER_FILES:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- files
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds it is fsync'ed and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(data: Any) -> bytes:
    """The bytes spp-hf writes for a JSON file (sorted keys, two-space indent, final newline)."""
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON durably and atomically."""
    atomic_write_bytes(path, json_bytes(data))


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors, durably and atomically."""
    tensors = _plain_tensors(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextmanager
def atomic_dir(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; when the block succeeds it replaces `path` atomically.

    With `keep_existing`, entries of the old folder that the new one does not write (another adapter's
    sub-folder, a Trainer's checkpoints) are hard-linked into the new folder before the swap. On error
    the staging folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
    try:
        yield staging
        if keep_existing and path.is_dir():
            _link_missing(path, staging)
        for folder, dirs, _ in os.walk(staging):
            for name in dirs:
                os.chmod(os.path.join(folder, name), DIR_MODE)
        os.chmod(staging, DIR_MODE)
        fsync_tree(staging)
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- adapters
@dataclass
class AdapterFiles:
    """One adapter's files: its config (the `spp_config.json` data), weights and model card."""

    config: dict[str, Any]
    tensors: Mapping[str, torch.Tensor]
    card: str | None = None
    metadata: Mapping[str, str] | None = None  # extra safetensors metadata, e.g. {"spp_adapter": name}


# Fields that only say where the base lives: re-keying an adapter to a pushed base (or fixing a moved
# base by hand) changes them without touching what the weights mean, so they are left out of the hash.
BASE_POINTER_FIELDS = ("base_model_name_or_path", "base_model_revision")


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a config without its base pointers: what the weights file records to pair the two."""
    return hashlib.sha256(json_bytes({k: v for k, v in config.items() if k not in BASE_POINTER_FIELDS})).hexdigest()


def _write_adapter_into(folder: Path, files: AdapterFiles, metadata: Mapping[str, str] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config_bytes = json_bytes(files.config)
    meta = {"format": "pt", **(metadata or {}), **(files.metadata or {}), CONFIG_HASH_KEY: config_sha256(files.config)}
    # weights first: in a folder written in place, a crash then leaves new weights with the old config,
    # which the recorded hash rejects, instead of a config that silently names other weights
    atomic_save_safetensors(files.tensors, folder / WEIGHTS_NAME, metadata=meta)
    atomic_write_bytes(folder / CONFIG_NAME, config_bytes)
    if files.card is not None:
        atomic_write_text(folder / README_NAME, files.card)


def _check_subfolder(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(
            f"Adapter sub-folder name {name!r} is not a plain folder name; use letters, digits, '-' or '_'."
        )


def write_adapters(
    directory: str | os.PathLike,
    adapters: Mapping[str, AdapterFiles],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write several adapters in one atomic folder replacement: key "" is the folder itself, others sub-folders.

    Files the new save does not write (other sub-folders, unrelated files) are kept.
    """
    for name in adapters:
        if name:
            _check_subfolder(name)
    with atomic_dir(directory, keep_existing=True) as staging:
        for name, files in adapters.items():
            _write_adapter_into(staging / name if name else staging, files, metadata)
    return Path(directory)


def write_adapter_folder(
    directory: str | os.PathLike,
    config_dict: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    card_text: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one adapter (`spp_config.json`, `spp_adapter.safetensors`, README.md) as one atomic folder swap."""
    return write_adapters(directory, {"": AdapterFiles(config_dict, tensors, card_text)}, metadata)


def write_adapter_files_in_place(
    directory: str | os.PathLike,
    config_dict: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    card_text: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an adapter's files into a folder someone else owns (a Trainer checkpoint), file by file.

    Each file is atomic and durable; the config hash in the weights file catches a crash between them.
    """
    directory = Path(directory)
    _write_adapter_into(directory, AdapterFiles(config_dict, tensors, card_text), metadata)
    return directory


def read_adapter_files(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config data, tensors) of a saved adapter, checked to come from the same save.

    Raises FileNotFoundError / ValueError that name the file and the fix for a missing, corrupt or
    mismatched file.
    """
    directory = recover_dir(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}: this is not an SPP adapter (a LoRA/PEFT adapter has "
            "adapter_config.json instead). Point to a folder or repo saved by spp-hf."
        )
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"No {WEIGHTS_NAME} in {directory}: the adapter is incomplete. Save it again with "
            "model.save_pretrained(...) or download it again."
        )
    config_bytes = config_path.read_bytes()
    config = _parse_json(config_path, config_bytes, "the adapter is corrupt: save or download it again")
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} does not hold a JSON object; the adapter is corrupt: save or download it again.")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{weights_path} is corrupt or not a safetensors file ({err}); save or download the adapter again."
        ) from None
    recorded = metadata.get(CONFIG_HASH_KEY)
    if recorded is not None and recorded != config_sha256(config):
        raise ValueError(
            f"{config_path} and {weights_path.name} come from two different saves (the weights record config "
            f"sha256 {recorded[:12]}, the config has {config_sha256(config)[:12]}): a save was interrupted, or the "
            "config was edited beyond its base_model_name_or_path/base_model_revision. Save the adapter again, or "
            "resume from an earlier checkpoint."
        )
    return config, tensors


def _parse_json(path: Path, data: bytes, fix: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); {fix}.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}.") from None


# --------------------------------------------------------------------------- model folders
def read_sparsity_json(path: str | os.PathLike) -> dict | None:
    """The contents of a sparsity.json (a file, or a model folder holding one), or None if there is none."""
    path = Path(path)
    if path.is_dir():
        path = recover_dir(path) / SPARSITY_NAME
    if not path.is_file():
        return None
    data = _parse_json(path, path.read_bytes(), "re-save or re-download the model")
    return data if isinstance(data, dict) else None


def sparsity_fingerprint(data: dict | None) -> dict | None:
    """The mask fingerprint ({"hash", "modules"}) recorded in a sparsity.json."""
    if not data:
        return None
    for key in ("mask_fingerprint", "fingerprint"):
        value = data.get(key)
        if isinstance(value, dict) and "modules" in value:
            return value
    return data if "modules" in data and "hash" in data else None


def model_sparsity_record(
    model: torch.nn.Module,
    kind: str,
    modules: list[str] | None = None,
    base_mask_fingerprint: dict | None = None,
    **provenance: Any,
) -> dict[str, Any]:
    """The sparsity.json of a model folder: kind, per-layer report, mask fingerprint, provenance.

    `modules` limits the fingerprint to those layers (a pruned base records the layers it pruned);
    default every linear layer but the output embedding. With `base_mask_fingerprint`, the model must
    have exactly those zeros (`sparsity.zero_mask_differences`), else ValueError and nothing is written.
    """
    from .sparsity import fingerprint_modules, iter_linear_weights, sparsity_report, zero_mask_differences

    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    with torch.no_grad():
        weights = dict(iter_linear_weights(model))
        if modules is not None:
            missing = [m for m in modules if m not in weights]
            if missing:
                raise ValueError(f"The model has no linear layers {missing[:3]}; pass names from iter_linear_weights.")
            weights = {m: weights[m] for m in modules}
        found = fingerprint_modules(weights.items())
        report = sparsity_report(model).to_dict()
    if base_mask_fingerprint:
        problems = zero_mask_differences(base_mask_fingerprint, found)
        if problems:
            raise ValueError(
                f"The {kind} model lost its base's zero mask in {len(problems)} layers ({'; '.join(problems[:3])}); "
                "nothing was written. Re-apply the base's mask before saving."
            )
    record: dict[str, Any] = {"format_version": SPARSITY_FORMAT_VERSION, "kind": kind, **report}
    record.update(provenance)
    record["mask_fingerprint"] = found
    if base_mask_fingerprint:
        record["base_mask_fingerprint"] = base_mask_fingerprint
    return record


def write_model_folder(
    model: torch.nn.Module,
    tokenizer: Any | None,
    directory: str | os.PathLike,
    card_text: str,
    sparsity: dict[str, Any],
) -> Path:
    """Write a full model folder (checkpoint, tokenizer, sparsity.json, README.md) as one atomic folder swap.

    Used for pruned bases and merged models; `sparsity` is usually `model_sparsity_record(...)`. Files
    of an earlier save (stale weight shards) do not survive: the folder is replaced as a whole.
    """
    if "mask_fingerprint" not in sparsity:
        raise ValueError("sparsity must hold a 'mask_fingerprint'; build it with artifacts.model_sparsity_record.")
    with atomic_dir(directory) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_bytes(staging / SPARSITY_NAME, json_bytes(sparsity))
        atomic_write_text(staging / README_NAME, card_text)
    return Path(directory)
