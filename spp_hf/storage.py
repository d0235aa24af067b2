"""Everything spp-hf writes to disk: file names, durable atomic writes, adapter folders, model folders.

spp-hf owns only the files it writes. Saving into an existing folder replaces spp-hf's own files and leaves
every other entry (hidden or not: `.git`, `.env`, a user's notes, a Trainer's checkpoints) and the folder's
mode as they were. A model folder is written only into a new or empty folder (hidden entries alone, as in a
fresh clone of a Hub repo, count as empty) or over an earlier spp-hf model folder of the same kind
(`check_model_folder_target`, called before any expensive work).

Durability. A file is written to a temp file beside its target (created like any new file, so the umask
decides its mode; a replaced file keeps its mode), fsync'ed and renamed onto the target, then the folder is
fsync'ed so the rename itself survives a power loss. A folder is written into a staging folder beside its
target; the entries of the old folder that the new save neither writes nor owns are hard-linked (copied
where links fail) into it, every file and folder is fsync'ed, then:

- target missing: the staging folder is renamed onto it (atomic), the parent fsync'ed;
- target present, on Linux: the two are swapped with `renameat2(RENAME_EXCHANGE)` (one atomic step:
  a reader sees the old folder or the new one, never neither), the parent fsync'ed, then the old
  folder (now under the staging name) removed;
- target present where the kernel or file system cannot exchange: the old folder is renamed aside, the
  new one renamed into place, the aside removed. A crash between the two renames leaves only the aside,
  which readers read (`readable_folder`) and the next writer renames back.

Temporary entries carry spp-hf's mark in their names (`.<name>.spp-hf-staging-…`, `.<name>.spp-hf-old-…`,
`.<name>.spp-hf-tmp-…`), followed by the writing process (pid and start time); only such names are ever
removed or renamed back, only by the next writer of the same target, never by a reader, and only once the
process that made them is gone: two processes writing one file (two `spp-hf run` of one config, each training
another method, both write its config.json) never remove each other's temporary entries; the last rename
wins. Output paths are resolved first (`.`, `~`, symlinks), so a symlinked output folder keeps pointing at the
new folder.

An adapter's config and weights live in one folder that is swapped as a whole, and the weights file
records the sha256 of the config bytes it was saved with (`spp_config_sha256` in the safetensors
metadata); `read_adapter_files` refuses a pair from two different saves (a folder written in place,
like a Trainer checkpoint, could otherwise mix them).

A sparse-PEFT adapter is written the same way under PEFT's names (`adapter_config.json`,
`adapter_model.safetensors`) plus spp-hf's record of its base (`spp_sparse_peft.json`); its weights file
records the sha256 of config and record together (`spp_sparse_peft_sha256`), checked by
`read_peft_adapter_files`. PEFT's files in a folder count as spp-hf's own only beside such a record.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import re
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from fnmatch import fnmatch
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
# A sparse-PEFT adapter (`spp_hf.get_sparse_peft_model`) is saved under PEFT's own file names, plus spp-hf's record.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, "adapter_model.bin")
SPARSE_PEFT_NAME = "spp_sparse_peft.json"
SPARSE_PEFT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, SPARSE_PEFT_NAME, README_NAME)
SPARSE_PEFT_HASH_KEY = "spp_sparse_peft_sha256"
SPARSITY_FORMAT_VERSION = 1
MODEL_KINDS = ("pruned-base", "spp-merged", "merged")
_KIND_FAMILIES = {"pruned-base": "pruned-base", "spp-merged": "merged", "merged": "merged"}
# What a transformers checkpoint (model and tokenizer) and spp-hf write into a model folder: an earlier save's
# copies are replaced (a stale weight shard must not survive); every other entry is the user's and stays.
MODEL_FOLDER_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.*", SPARSITY_NAME, README_NAME,
)  # fmt: skip
_OWN_MARK = ".spp-hf-"


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


# --------------------------------------------------------------------------- spp-hf's own temporary names
def _process_start(pid: int) -> int:
    """When process `pid` started (clock ticks since boot, from /proc; 0 where there is none): with the pid it
    names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


_WRITER_IN_NAME = re.compile(r"(\d+)-(\d+)-[0-9a-f]{12}")


def _own_sibling(path: Path, what: str) -> Path:
    """A fresh name beside `path` that marks a temporary entry as spp-hf's and names the process writing it:
    `.<name>.spp-hf-<what>-<pid>-<start>-<random>`."""
    pid = os.getpid()
    return path.parent / f".{path.name}{_OWN_MARK}{what}-{pid}-{_process_start(pid)}-{secrets.token_hex(6)}"


def _own_siblings(path: Path, what: str) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}{_OWN_MARK}{what}-*"))


def _writer_alive(entry: Path, what: str) -> bool:
    """Whether the process that named `entry` still runs (another process writing the same target, or another
    thread of this one): its temporary entry is not a leftover. A name without a writer is a leftover."""
    found = _WRITER_IN_NAME.fullmatch(entry.name.rsplit(f"{_OWN_MARK}{what}-", 1)[-1])
    if found is None:
        return False
    pid, start = int(found[1]), int(found[2])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _process_start(pid) == start


def _leftovers(path: Path, what: str) -> list[Path]:
    """spp-hf's temporary entries of kind `what` beside `path` whose writer is gone (killed): safe to remove."""
    return [entry for entry in _own_siblings(path, what) if not _writer_alive(entry, what)]


def resolve_target(path: str | os.PathLike) -> Path:
    """The real path a write to `path` replaces: `~`, `.`, `..` and symlinks resolved, so `save_pretrained(".")`
    works and an output folder that is a symlink (`out -> /scratch/x`) stays a link to the new folder."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def check_writable_target(path: str | os.PathLike) -> Path:
    """`resolve_target(path)`, refused with the fix if it exists and is not a folder."""
    target = resolve_target(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; remove it or choose another output folder.")
    return target


def _clean_leftovers(path: Path) -> None:
    """Remove what a killed writer of `path` left (only names spp-hf marked as its own); writers call it, never
    readers. A set-aside old folder is renamed back when `path` itself is missing (a kill between the two
    renames of the rename-aside path), else removed."""
    for staging in _leftovers(path, "staging"):
        shutil.rmtree(staging, ignore_errors=True)
    for aside in _leftovers(path, "old"):
        if not os.path.lexists(path):
            os.rename(aside, path)
            fsync_dir(path.parent)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def readable_folder(path: str | os.PathLike) -> Path:
    """`path`, or, while a killed rename-aside swap left it missing, the complete old folder spp-hf set aside
    (only read here; the next writer puts it back)."""
    target = resolve_target(path)
    if not target.exists():
        asides = _own_siblings(target, "old")
        if len(asides) == 1:
            return asides[0]
    return Path(path)


# --------------------------------------------------------------------------- folder swap
def _replace_dir(staging: Path, path: Path) -> None:
    """Put the complete folder `staging` at `path` (see the module docstring for the steps)."""
    cwd = _cwd_inside(path)
    if not path.exists():
        os.rename(staging, path)
        fsync_dir(path.parent)
        return
    if exchange(staging, path):
        fsync_dir(path.parent)
        _chdir_back(path, cwd)
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = _own_sibling(path, "old")
    os.rename(path, aside)
    fsync_dir(path.parent)
    os.rename(staging, path)
    fsync_dir(path.parent)
    _chdir_back(path, cwd)
    shutil.rmtree(aside, ignore_errors=True)


def _cwd_inside(path: Path) -> Path | None:
    """The working directory relative to `path` when it lies inside it (a swap moves the folder under it)."""
    try:
        return Path(os.getcwd()).relative_to(path)
    except (ValueError, OSError):
        return None


def _chdir_back(path: Path, relative: Path | None) -> None:
    if relative is not None:
        target = path / relative
        os.chdir(target if target.is_dir() else path)


def _carry_over(old: Path, new: Path, owned: Callable[[Path], bool]) -> None:
    """Hard-link (copy where links fail) into `new` every entry of `old` that `new` lacks and `owned` does not
    claim, hidden ones (`.git`, `.env`) included, keeping modes and symlinks: the user's files survive the swap."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir() and not entry.is_symlink():
            _carry_over(entry, target, owned)  # a sub-folder the new save writes keeps the user's files in it
            continue
        if os.path.lexists(target) or owned(entry):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            _refuse_mounts(entry)
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _refuse_mounts(folder: Path) -> None:
    for root, dirs, _ in os.walk(folder):
        if any(os.path.ismount(os.path.join(root, d)) for d in [".", *dirs]):
            raise OSError(
                f"{root} inside the output folder is a mount point; spp-hf replaces its output folder as a whole and "
                "will not move a mounted file system. Save into another folder."
            )


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _new_staging(path: Path) -> Path:
    """An empty staging folder beside `path`: mode from the umask (plain mkdir) for a new folder, else the old
    folder's mode and group, set before anything is written so a setgid folder's group reaches its files."""
    staging = _own_sibling(path, "staging")
    os.mkdir(staging)
    if path.is_dir():
        old = path.stat()
        with suppress(PermissionError):
            os.chown(staging, -1, old.st_gid)
        os.chmod(staging, stat.S_IMODE(old.st_mode) | stat.S_IRWXU)
    return staging


def _keep_modes(old: Path, new: Path) -> None:
    """Files the new folder replaces keep the old ones' modes, and the folder its own (as an in-place save would)."""
    for entry in new.iterdir():
        previous = old / entry.name
        if entry.is_file() and not entry.is_symlink() and previous.is_file() and not previous.is_symlink():
            os.chmod(entry, stat.S_IMODE(previous.stat().st_mode))
    os.chmod(new, stat.S_IMODE(old.stat().st_mode))


def _never_owned(entry: Path) -> bool:
    return False



# --------------------------------------------------------------------------- files
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds it is fsync'ed and renamed onto `path`.

    The temp file is created like any new file (the umask decides its mode); a replaced file keeps its mode.
    A killed writer's temp file for the same `path` is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _leftovers(path, "tmp"):
        leftover.unlink(missing_ok=True)
    tmp = _own_sibling(path, "tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    new_file_mode = stat.S_IMODE(tmp.stat().st_mode)  # writers that replace the file (safetensors) may change it
    try:
        yield tmp
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else new_file_mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
def atomic_dir(path: str | os.PathLike, owned: Callable[[Path], bool] = _never_owned) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; when the block succeeds it replaces `path` atomically.

    Entries of an existing `path` that the block did not write are carried over unless `owned` claims them
    (an earlier save's stale files): spp-hf replaces only its own files. The folder keeps its mode. On error
    the staging folder is removed and `path` is untouched; a killed writer's leftovers go with the next write.
    """
    path = check_writable_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    staging = _new_staging(path)
    try:
        yield staging
        if path.is_dir():
            _carry_over(path, staging, owned)
            _keep_modes(path, staging)
        fsync_tree(staging)
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- adapters
# Fields that only say where the base lives: re-keying an adapter to a pushed base (or fixing a moved
# base by hand) changes them without touching what the weights mean, so they are left out of the hash.
BASE_POINTER_FIELDS = ("base_model_name_or_path", "base_model_revision")
PEFT_BASE_POINTER_FIELDS = ("base_model_name_or_path", "revision")  # the same two in PEFT's adapter_config.json


@dataclass
class AdapterFiles:
    """One adapter's files: its config (the `spp_config.json` data), weights and model card."""

    config: dict[str, Any]
    tensors: Mapping[str, torch.Tensor]
    card: str | None = None
    metadata: Mapping[str, str] | None = None  # extra safetensors metadata, e.g. {"spp_adapter": name}

    @property
    def base(self) -> tuple[str | None, str | None]:
        """(name or path, revision) of the pruned base the adapter belongs to."""
        return self.config.get("base_model_name_or_path"), self.config.get("base_model_revision")

    @property
    def mask_fingerprint(self) -> dict | None:
        return self.config.get("mask_fingerprint")

    def rekeyed(self, base: str | None, revision: str | None, card: str | None = None) -> "AdapterFiles":
        """The same adapter keyed to another copy of its base (`base`@`revision`): only the base pointers change."""
        config = {**self.config, "base_model_name_or_path": base, "base_model_revision": revision}
        return AdapterFiles(config, self.tensors, card, self.metadata)

    def write_into(self, folder: Path, metadata: Mapping[str, str] | None = None) -> None:
        _write_adapter_into(folder, self, metadata)


@dataclass
class PeftAdapterFiles:
    """One sparse-PEFT adapter's files: PEFT's `adapter_config.json` data (as written: a masked adapter's
    `peft_type` is spp-hf's marker), spp-hf's record of its base (`spp_sparse_peft.json`), weights (keyed as
    PEFT keys them) and model card."""

    config: dict[str, Any]
    record: dict[str, Any]
    tensors: Mapping[str, torch.Tensor]
    card: str | None = None

    @property
    def base(self) -> tuple[str | None, str | None]:
        return self.record.get("base_model_name_or_path"), self.record.get("base_model_revision")

    @property
    def mask_fingerprint(self) -> dict | None:
        return self.record.get("mask_fingerprint")

    def rekeyed(self, base: str | None, revision: str | None, card: str | None = None) -> "PeftAdapterFiles":
        """Keyed to `base`@`revision` in the record and in PEFT's config (`base_model_name_or_path`, `revision`)."""
        config = {**self.config, "base_model_name_or_path": base, "revision": revision}
        record = {**self.record, "base_model_name_or_path": base, "base_model_revision": revision}
        return PeftAdapterFiles(config, record, self.tensors, card)

    def write_into(self, folder: Path, metadata: Mapping[str, str] | None = None) -> None:
        """Weights first (recording the hash of config and record), then config, record and card, each atomic."""
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", **(metadata or {}), SPARSE_PEFT_HASH_KEY: sparse_peft_sha256(self.config, self.record)}
        atomic_save_safetensors(self.tensors, folder / PEFT_WEIGHTS_NAME, metadata=meta)
        atomic_write_bytes(folder / PEFT_CONFIG_NAME, json_bytes(self.config))
        atomic_write_bytes(folder / SPARSE_PEFT_NAME, json_bytes(self.record))
        if self.card is not None:
            atomic_write_text(folder / README_NAME, self.card)


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a config without its base pointers: what the weights file records to pair the two."""
    return hashlib.sha256(json_bytes({k: v for k, v in config.items() if k not in BASE_POINTER_FIELDS})).hexdigest()


def sparse_peft_sha256(config: dict[str, Any], record: dict[str, Any]) -> str:
    """sha256 of a sparse-PEFT adapter's config and record without their base pointers (see `config_sha256`)."""
    data = {
        "adapter_config": {k: v for k, v in config.items() if k not in PEFT_BASE_POINTER_FIELDS},
        "record": {k: v for k, v in record.items() if k not in BASE_POINTER_FIELDS},
    }
    return hashlib.sha256(json_bytes(data)).hexdigest()


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


def _adapter_owned(entry: Path) -> bool:
    """An earlier adapter's files: its config, weights and record, PEFT's files beside spp-hf's record, and a
    README.md that is an spp-hf card (a user's own PEFT adapter or README beside them is theirs)."""
    if entry.name in (CONFIG_NAME, WEIGHTS_NAME, SPARSE_PEFT_NAME):
        return True
    if entry.name in PEFT_FILES:
        return (entry.parent / SPARSE_PEFT_NAME).is_file()
    return entry.name == README_NAME and is_spp_card(entry)


def is_spp_card(path: Path) -> bool:
    """Whether a README.md is an adapter card spp-hf rendered (its front matter says `library_name: spp-hf`)."""
    if not path.is_file() or path.is_symlink():
        return False
    head = path.read_bytes()[:4096].decode("utf-8", errors="replace")
    front = head.split("\n---", 1)[0] if head.startswith("---") else ""
    return "library_name: spp-hf" in front


def _check_subfolder(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(
            f"Adapter sub-folder name {name!r} is not a plain folder name; use letters, digits, '-' or '_'."
        )


def write_adapters(
    directory: str | os.PathLike,
    adapters: Mapping[str, AdapterFiles | PeftAdapterFiles],
    metadata: Mapping[str, str] | None = None,
    in_place: bool = False,
) -> Path:
    """Write several adapters (SPP's files or sparse PEFT's) in one atomic folder replacement: key "" is the folder
    itself, others sub-folders.

    Entries the new save does not write (other sub-folders, a Trainer's checkpoints, `.git`, user files) are
    kept; an earlier adapter's files are not, nor its README.md when spp-hf wrote it (a save without a card
    must not keep the card of the adapter it replaces). With `in_place` the files are written file by file
    into the folder as it is (a Trainer's checkpoint folder, which the Trainer owns): each atomic, paired by
    the hash the weights record.
    """
    for name in adapters:
        if name:
            _check_subfolder(name)
    with nullcontext(check_writable_target(directory)) if in_place else atomic_dir(directory, owned=_adapter_owned) as folder:
        for name, files in adapters.items():
            files.write_into(folder / name if name else folder, metadata)
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
    return write_adapters(directory, {"": AdapterFiles(config_dict, tensors, card_text)}, metadata, in_place=True)


def read_adapter_files(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config data, tensors) of a saved adapter, checked to come from the same save.

    Raises FileNotFoundError / ValueError that name the file and the fix for a missing, corrupt or
    mismatched file.
    """
    directory = readable_folder(directory)
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
    config = _read_json_object(config_path)
    metadata, tensors = _read_safetensors(weights_path)
    recorded = metadata.get(CONFIG_HASH_KEY)
    if recorded is not None and recorded != config_sha256(config):
        raise ValueError(
            f"{config_path} and {weights_path.name} come from two different saves (the weights record config "
            f"sha256 {recorded[:12]}, the config has {config_sha256(config)[:12]}): a save was interrupted, or the "
            "config was edited beyond its base_model_name_or_path/base_model_revision. Save the adapter again, or "
            "resume from an earlier checkpoint."
        )
    return config, tensors


def read_peft_adapter_files(directory: str | os.PathLike) -> PeftAdapterFiles:
    """A sparse-PEFT adapter's config, record and tensors, checked to come from one spp-hf save (card: None).

    Raises FileNotFoundError / ValueError that name the file and the fix for a missing, corrupt or mismatched
    file; weights that record no hash were not written with this record (e.g. PEFT's own save over the folder).
    """
    directory = readable_folder(directory)
    record_path, config_path, weights_path = (directory / n for n in (SPARSE_PEFT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME))
    if not record_path.is_file():
        raise FileNotFoundError(
            f"No {SPARSE_PEFT_NAME} in {directory}: this is not a sparse-PEFT adapter saved by spp-hf (a plain PEFT "
            "adapter loads with peft.PeftModel.from_pretrained; an SPP adapter has spp_config.json)."
        )
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"No {path.name} in {directory}: the adapter is incomplete. Save it again with "
                "model.save_pretrained(...) or download it again."
            )
    config, record = _read_json_object(config_path), _read_json_object(record_path)
    metadata, tensors = _read_safetensors(weights_path)
    expected, recorded = sparse_peft_sha256(config, record), metadata.get(SPARSE_PEFT_HASH_KEY)
    if recorded != expected:
        why = "records no spp-hf hash (it was written by another save, e.g. PEFT's own)" if recorded is None else (
            f"record sha256 {recorded[:12]}, the config and record have {expected[:12]}")
        raise ValueError(
            f"{weights_path.name}, {PEFT_CONFIG_NAME} and {SPARSE_PEFT_NAME} in {directory} come from different saves "
            f"(the weights {why}): a save was interrupted, or a file was replaced or edited beyond its base pointers. "
            "Save the adapter again with the model get_sparse_peft_model returned, or resume from an earlier checkpoint."
        )
    return PeftAdapterFiles(config, record, tensors)


def is_sparse_peft_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a sparse-PEFT adapter saved by spp-hf (its record of the base)."""
    return (Path(folder) / SPARSE_PEFT_NAME).is_file()


def read_adapter_folder(directory: str | os.PathLike) -> AdapterFiles | PeftAdapterFiles:
    """The adapter saved in `directory` in either format (SPP's files, or a sparse-PEFT adapter), checked to come
    from one save; its README.md as the card when it has one."""
    directory = Path(directory)
    if is_sparse_peft_folder(readable_folder(directory)):
        files: AdapterFiles | PeftAdapterFiles = read_peft_adapter_files(directory)
    else:
        files = AdapterFiles(*read_adapter_files(directory))
    card = readable_folder(directory) / README_NAME
    files.card = card.read_text(encoding="utf-8") if card.is_file() else None
    return files


def _read_json_object(path: Path) -> dict[str, Any]:
    data = _parse_json(path, path.read_bytes(), "the adapter is corrupt: save or download it again")
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object; the adapter is corrupt: save or download it again.")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter's weights file, a corrupt file reported with the fix."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or not a safetensors file ({err}); save or download the adapter again.") from None
    return metadata, tensors


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
    folder = readable_folder(path)
    if path.is_dir() or folder != path:
        path = folder / SPARSITY_NAME
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


def write_model_folder(
    model: torch.nn.Module,
    tokenizer: Any | None,
    directory: str | os.PathLike,
    card_text: str,
    sparsity: dict[str, Any],
) -> Path:
    """Write a full model folder (checkpoint, tokenizer, sparsity.json, README.md) as one atomic folder swap.

    Used for pruned bases and merged models; `sparsity` is usually `sparsity.model_sparsity_record(...)`. Files
    of an earlier save (stale weight shards, `MODEL_FOLDER_FILES`) do not survive; the user's entries do.
    `directory` must pass `check_model_folder_target` (callers check it before the expensive work too).
    """
    if "mask_fingerprint" not in sparsity:
        raise ValueError("sparsity must hold a 'mask_fingerprint'; build it with sparsity.model_sparsity_record.")
    check_model_folder_target(directory, sparsity["kind"])
    with atomic_dir(directory, owned=_model_file) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_bytes(staging / SPARSITY_NAME, json_bytes(sparsity))
        atomic_write_text(staging / README_NAME, card_text)
    return Path(directory)


def _model_file(entry: Path) -> bool:
    """An earlier save's checkpoint, tokenizer, sparsity.json or card file."""
    return not entry.is_dir() and any(fnmatch(entry.name, p) for p in MODEL_FOLDER_FILES)


def check_model_folder_target(directory: str | os.PathLike, kind: str) -> Path:
    """The resolved output folder for a `kind` model, refused unless spp-hf may write there.

    Allowed: a missing folder, one with only hidden entries (a fresh clone of a Hub repo), or an earlier spp-hf
    model folder of the same kind (a pruned base, or a merged model). Call it before the expensive work.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    target = check_writable_target(directory)
    if not target.is_dir() or not any(not e.name.startswith(".") for e in target.iterdir()):
        return target
    try:
        found = (read_sparsity_json(target) or {}).get("kind")
    except ValueError:
        found = None
    if _KIND_FAMILIES.get(found) == _KIND_FAMILIES[kind]:
        return target
    what = f"an spp-hf {found} folder" if found in MODEL_KINDS else "not a model folder spp-hf wrote"
    raise FileExistsError(
        f"{directory} is not empty and is {what}; spp-hf writes a {kind} model only into a new or empty folder or "
        f"over an earlier one of the same kind, and never deletes files it did not write. Pass another output "
        "folder (e.g. a new sub-folder), or empty this one."
    )


# --------------------------------------------------------------------------- model folders written part by part
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_SHARD_METADATA = {"format": "pt"}  # what transformers records in each shard it writes
_PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_PART_KEY = re.compile(r"[0-9a-f]{8,64}")


class PartialModelFolder:
    """The finished parts (safetensors files) of a model folder written piece by piece (a checkpoint too large to
    hold in memory), kept until `write_model_folder_from_parts` turns them into the folder.

    It lives beside the target as `.<name>.spp-hf-partial-<key>`, `key` naming the run's inputs and settings (a
    hash the caller computes). A part is written to a temporary name and appears under its own name only once it
    is on disk (fsync'ed, renamed, folder fsync'ed), so a part that exists is complete: a run with the same key
    finds what an interrupted run finished and goes on from there. A run with another key removes it, as the next
    writer of a target removes every temporary entry spp-hf left beside it.
    """

    def __init__(self, directory: str | os.PathLike, kind: str, key: str) -> None:
        if not _PART_KEY.fullmatch(key):
            raise ValueError(f"A partial folder's key must be 8-64 lowercase hex digits (a hash), got {key!r}.")
        self.target = check_model_folder_target(directory, kind)
        self.kind = kind
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.folder = self.target.parent / f".{self.target.name}{_OWN_MARK}partial-{key}"
        for other in _own_siblings(self.target, "partial"):
            if other != self.folder:
                shutil.rmtree(other, ignore_errors=True)
        self.folder.mkdir(exist_ok=True)
        fsync_dir(self.target.parent)
        self._pending: Future | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spp-hf-part-writer")

    def path(self, part: str) -> Path:
        if not _PART_NAME.fullmatch(part):
            raise ValueError(f"Part name {part!r} is not a plain name (letters, digits, '_' or '-').")
        return self.folder / f"{part}.safetensors"

    def has(self, part: str) -> bool:
        """Whether `part` was finished (by this run or an interrupted one with the same key)."""
        return self.path(part).is_file()

    def write(self, part: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write one part as a transformers shard, in the background: its bytes are written and made durable and
        visible (fsync, rename) while the caller prepares the next part, the disk work overlapping the caller's.
        The pending write holds the tensors until it is done: the caller may drop its references but must not change
        the tensors. At most one part is pending; `flush` waits for it."""
        self.flush()
        path = self.path(part)
        for leftover in _leftovers(path, "tmp"):
            leftover.unlink(missing_ok=True)
        self._pending = self._writer.submit(_write_part, _plain_tensors(tensors), _own_sibling(path, "tmp"), path)

    def flush(self) -> None:
        """Wait until every part written is on disk under its name (re-raising a failure to get it there)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def remove(self) -> None:
        self.flush()
        shutil.rmtree(self.folder, ignore_errors=True)
        fsync_dir(self.folder.parent)


def _write_part(tensors: dict[str, torch.Tensor], tmp: Path, path: Path) -> None:
    """Write `tensors` to `tmp` as a transformers shard, make it durable, then give it its name, durably (what
    `atomic_path` does, run by `PartialModelFolder`'s background writer)."""
    try:
        save_file(tensors, str(tmp), metadata=dict(_SHARD_METADATA))
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_model_folder_from_parts(
    directory: str | os.PathLike,
    parts: PartialModelFolder,
    names: list[str],
    configs: list[Any],
    tokenizer: Any | None,
    card_text: str,
    sparsity: dict[str, Any],
    max_shard_size: int,
    total_parameters: int,
) -> Path:
    """`write_model_folder` for a checkpoint written part by part: the same files, checks and one atomic folder swap.

    The parts (in `names` order) become the weight shards: consecutive parts are packed into shards of at most
    `max_shard_size` bytes, as transformers shards (one `model.safetensors` when everything fits, else
    `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`). A shard of one part is a hard link to
    it; only packed parts are read back, one shard at a time. `configs` are the objects whose `save_pretrained`
    writes config.json and generation_config.json. The parts' folder is removed once the folder is in place.
    """
    if "mask_fingerprint" not in sparsity:
        raise ValueError("sparsity must hold a 'mask_fingerprint'; build it with sparsity.model_sparsity_record.")
    check_model_folder_target(directory, sparsity["kind"])
    parts.flush()
    with atomic_dir(directory, owned=_model_file) as staging:
        for config in configs:
            config.save_pretrained(staging)
        _write_shards(staging, [parts.path(name) for name in names], max_shard_size, total_parameters)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_bytes(staging / SPARSITY_NAME, json_bytes(sparsity))
        atomic_write_text(staging / README_NAME, card_text)
    parts.remove()
    return Path(directory)


def pack_in_order(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """The indices of `sizes`, in order, in consecutive groups whose sizes add up to at most `limit` (an item
    larger than `limit` forms a group of its own): how parts are packed into shards."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= limit:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def _write_shards(folder: Path, parts: list[Path], max_shard_size: int, total_parameters: int) -> None:
    """The weight files of a checkpoint from its part files (see `write_model_folder_from_parts`)."""
    layouts = [_safetensors_layout(part) for part in parts]
    groups = pack_in_order([nbytes for _, nbytes in layouts], max_shard_size)
    count = len(groups)
    names = [SAFE_WEIGHTS_NAME] if count == 1 else [SHARD_NAME.format(index=i + 1, count=count) for i in range(count)]
    weight_map = {}
    for name, group in zip(names, groups):
        if len(group) == 1:
            _link_or_copy(parts[group[0]], folder / name)
        else:
            tensors: dict[str, torch.Tensor] = {}
            for i in group:
                with safe_open(str(parts[i]), framework="pt") as handle:
                    tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
            atomic_save_safetensors(tensors, folder / name, dict(_SHARD_METADATA))
            del tensors
        weight_map.update({key: name for i in group for key in layouts[i][0]})
    if count > 1:
        total_size = sum(nbytes for _, nbytes in layouts)
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size}, "weight_map": weight_map}
        atomic_write_bytes(folder / SAFE_INDEX_NAME, json_bytes(index))


def _safetensors_layout(path: Path) -> tuple[list[str], int]:
    """(tensor names, bytes of tensor data) of a safetensors file, from its header alone (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return [key for key in header if key != "__metadata__"], os.path.getsize(path) - 8 - length
