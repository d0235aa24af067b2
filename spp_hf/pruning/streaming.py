"""Streaming prune: a checkpoint pruned decoder layer by decoder layer, never loaded whole.

Wanda and SparseGPT only ever need one decoder layer and the calibration activations at a time (as
llm-compressor's "sequential onloading"). `prune_to_folder` builds the model on the meta device (transformers'
own init, so nothing is allocated), reads the tensors of one decoder layer at a time from the checkpoint's
safetensors files (`safe_open`; the file is mapped copy-on-write), prunes it with the same per-block step as the
in-memory `prune` (`sequential.prune_block`), writes it as one part of the output and frees it.

Memory: one decoder layer, one buffer of calibration activations (in the model's dtype; each layer's outputs
overwrite its inputs) and what one block call makes of a batch of them (batches sized by
`sequential.batch_size_for` to about one block's weights). The embeddings are read only for the capture of the
first layer's inputs and released before any decoder layer runs; an untied output head is only copied into
the output (the tensors outside the layers go there first, one embedding table at a time: `rest_parts`).
SparseGPT's Hessians go with the last module using them and are inverted in their own memory. Large
allocations are returned to the OS when freed (`large_frees_returned`), so the peak is what is live. On an
8-layer float32 Llama of 416 MB (hidden 1024, tied vocab 32000) the CLI peaks 0.40x (Wanda) and 0.42x
(SparseGPT) the checkpoint's size above a process that only imported spp_hf, at 8 x 512 calibration tokens;
untied (547 MB), 0.31x and 0.32x (`benchmarks/bench_prune_memory.py`).

The output is the folder `prune` + `save_pruned` write, bit for bit in its tensors, `sparsity.json` (apart from
the time taken) and card: a sharded transformers checkpoint written through `storage` with the same crash
safety. The finished layers wait in a partial folder beside the output (`storage.PartialModelFolder`), keyed by
the checkpoint and the settings, so a killed run started again with the same arguments resumes at the first
layer it had not finished; the layers before it are only run forward to rebuild that layer's inputs.

`StreamedCheckpoint` (the meta model, tensor reads, one layer in memory at a time, a folder's statistics read
back layer by layer) is shared with the streaming merge (`spp_hf.adapters.streaming_merge`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from ..hub.cards import render_pruned_base_card
from ..hub.transfer import SPPHubError, base_model_errors, explain_hub_error
from ..layer_weights import dense_weight, in_out_features, is_linear_like
from ..sparsity import PRUNING_METHODS, LayerSparsity, SparsityReport, fingerprint_modules, sparsity_report
from ..storage import (
    SAFE_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SPARSITY_FORMAT_VERSION,
    PartialModelFolder,
    pack_in_order,
    check_model_folder_target,
    write_model_folder_from_parts,
)
from ..training.cpu_allocator import keep_freed_memory
from ..version import __version__
from .api import PruneReport, _calibration_mode, _method_fns, select_modules
from .calibration import CalibrationData, load_calibration
from .magnitude import prune_magnitude_
from .masks import SparsitySpec, parse_sparsity
from .sequential import (
    BlockInputs,
    advance,
    batch_size_for,
    block_name,
    block_targets,
    calibration_batches,
    capture_layer_inputs,
    find_decoder_layers,
    prune_block,
    single_threaded,
)
from .sparsegpt import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP

DEFAULT_MAX_SHARD_SIZE = "100MB"
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]  # what streaming downloads
REST_PART = "rest"  # the prefix of the parts (`rest_parts`) that hold the tensors outside the decoder layers
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes of a size given as an int or as transformers writes it ("100MB", "5GB", "512MiB")."""
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {value!r} is not a positive size such as 100MB, 5GB or a number of bytes.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def layer_part(index: int) -> str:
    """The part name of decoder layer `index` in a partial folder."""
    return f"layer-{index:05d}"


def local_checkpoint(
    name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None, role: str = "model"
) -> Path:
    """A local folder holding the checkpoint: `name_or_path` itself, or its config, tokenizer and safetensors files
    downloaded from the Hub (into the Hub cache; the weights are then read from there layer by layer). Download
    errors name the repo and the fix; `role` "base" words them for an adapter's base."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    download = functools.partial(snapshot_download, str(name_or_path), revision=revision, token=token, allow_patterns=CHECKPOINT_FILES)
    if role == "base":
        with base_model_errors(str(name_or_path), revision, token):
            return Path(download())
    try:
        return Path(download())
    except (OSError, ValueError) as err:
        raise SPPHubError(explain_hub_error(err, str(name_or_path), revision, token, role=role)) from err


def weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a transformers checkpoint folder (sharded or one file)."""
    index = folder / SAFE_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / SAFE_WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(
            f"{folder} has no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME}: streaming reads safetensors checkpoints only. "
            "Convert it (load it and save_pretrained it once), or prune it in memory (spp-hf prune --in-memory)."
        )
    with safe_open(str(single), framework="pt") as handle:
        return {key: single for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__


def read_tensors(where: Mapping[str, Path], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tensors `keys` from the safetensors files `where` names. safetensors maps each file copy-on-write: a tensor's
    pages are read when first touched, writes stay private (the file never changes), and the pages leave the
    process with the tensors, so a released layer takes its memory with it."""
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(where[key], []).append(key)
    tensors = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for key in names:
                tensors[key] = handle.get_tensor(key)
    return tensors


def part_files(parts: PartialModelFolder, names: Sequence[str]) -> dict[str, Path]:
    """{tensor name: part file} of finished parts (waiting for the last one written to be on disk)."""
    parts.flush()
    where = {}
    for name in names:
        path = parts.path(name)
        with safe_open(str(path), framework="pt") as handle:
            where.update({key: path for key in handle.keys()})  # noqa: SIM118
    return where


def _checkpoint_dtype(config: Any, where: Mapping[str, Path]) -> torch.dtype:
    """The dtype `from_pretrained` loads in by default ("auto"): the config's, else the first floating tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    for key, path in where.items():
        with safe_open(str(path), framework="pt") as handle:
            if handle.get_slice(key).get_dtype() in ("F64", "F32", "F16", "BF16"):
                return handle.get_tensor(key).dtype
    return torch.float32


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """glibc's `name` (malloc_trim, mallopt), or None off Linux / glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc
        return None
    function.restype = ctypes.c_int
    return function


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


def return_freed_memory() -> None:
    """Hand the pages of freed tensors back to the OS (glibc `malloc_trim`). A no-op off glibc.

    The CLI keeps freed memory in the process for training speed (`training.cpu_allocator.keep_freed_memory`):
    temporaries of other sizes then land on fresh heap pages and the resident size creeps up. Called where a phase
    leaves much memory free: after tokenizing the calibration text, after the capture, after each module a
    calibrated method pruned, after each layer's forward pass over the calibration activations (the next layer's
    statistics pass did not fit in the holes it left: with every size on the heap, Wanda peaked 35% higher
    without it), after each layer read back for sparsity.json or merged.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number
_GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial mmap threshold
LARGE_ALLOCATION = 1 << 20  # bytes from which `large_frees_returned` maps each allocation on its own


@contextmanager
def large_frees_returned(threshold: int = LARGE_ALLOCATION) -> Iterator[None]:
    """For the duration, glibc serves every allocation of `threshold` bytes or more with a mapping of its own
    (`mallopt(M_MMAP_THRESHOLD)`), which leaves the process the moment it is freed. A no-op off glibc.

    The streamed prune's memory is then what its live tensors hold. From the heap (the CLI's
    `training.cpu_allocator.keep_freed_memory` puts every size there), a layer's activations, Hessians and their
    inverses, of many sizes, left holes that later sizes did not fit: the peak was 25-50 MB higher and varied from
    run to run by as much (`benchmarks/bench_prune_memory.py`). The cost is page faults, a few percent of the
    time. Afterwards the CLI's setting is put back if it was on, else glibc's initial threshold (glibc no longer
    raises it by itself after a free).
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        yield
        return
    try:
        yield
    finally:
        if keep_freed_memory.cache_info().currsize and keep_freed_memory():
            keep_freed_memory.__wrapped__()  # the process's setting, applied again
        else:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD)


def release(module: nn.Module) -> None:
    """Put a module's parameters and persistent buffers back on the meta device, freeing their memory."""
    module.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in module.state_dict().items()}, assign=True)


class StreamedCheckpoint:
    """A checkpoint as a model on the meta device whose parts are read from its safetensors files when needed.

    `model` is built as `from_pretrained` builds it (meta-device init in `dtype`, non-persistent buffers such as
    rotary tables initialised by transformers), so a layer read here equals the same layer of the loaded model
    bit for bit. `output_keys` are the tensor names `save_pretrained` would write (tied copies left out).
    """

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype | str | None = None) -> None:
        self.folder = Path(folder)
        self.source = weight_files(self.folder)
        self.config = AutoConfig.from_pretrained(self.folder)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else _checkpoint_dtype(self.config, self.source)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        for key, buffer in self.model.named_non_persistent_buffers():
            owner, _, name = key.rpartition(".")
            self.model.get_submodule(owner).register_buffer(name, torch.empty_like(buffer, device="cpu"), persistent=False)
        self.model.initialize_weights()  # fills the non-persistent buffers as from_pretrained does; weights stay meta
        generation = self.folder / "generation_config.json"
        if self.model.can_generate() and generation.is_file():
            self.model.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.layers_name, self.layers = find_decoder_layers(self.model)
        state = self.model.state_dict()
        ignored = set(getattr(self.model, "_keys_to_ignore_on_save", None) or ())
        self.output_keys = [k for k in remove_tied_weights_from_state_dict(dict(state), self.model) if k not in ignored]
        self._alias = self._tied_aliases()
        missing = [k for k in self.output_keys if k not in self.source]
        if missing:
            raise ValueError(
                f"{self.folder} lacks tensors {missing[:3]} that {type(self.model).__name__} has: transformers renames or "
                "converts this architecture's tensors when it loads it, which streaming does not do. Prune or merge it in "
                "memory instead (spp-hf prune --in-memory / spp-hf merge --in-memory)."
            )

    def _tied_aliases(self) -> dict[str, str]:
        """{name: the output name holding the same tensor} for tied names left out of the output (lm_head -> embed)."""
        owners: dict[int, list[str]] = {}
        for name, tensor in [*self.model.named_parameters(remove_duplicate=False), *self.model.named_buffers(remove_duplicate=False)]:
            owners.setdefault(id(tensor), []).append(name)
        kept = set(self.output_keys)
        return {n: next(k for k in names if k in kept) for names in owners.values() if any(k in kept for k in names) for n in names}

    def block_prefix(self, index: int) -> str:
        return block_name(self.layers_name, index) + "."

    def layer_index(self, name: str) -> int | None:
        """The decoder layer a module or tensor name lies in, or None outside the layers."""
        head = f"{self.layers_name}." if self.layers_name else ""
        if not name.startswith(head):
            return None
        first = name[len(head) :].split(".", 1)[0]
        return int(first) if first.isdigit() and int(first) < len(self.layers) else None

    def materialise(self, module: nn.Module, prefix: str, where: Mapping[str, Path]) -> None:
        """Read `module`'s tensors (names under `prefix`) from `where` into it, cast to the model's dtypes."""
        wanted = module.state_dict()
        tensors = read_tensors(where, [self._alias.get(prefix + k, prefix + k) for k in wanted])
        module.load_state_dict(
            {k: tensors[self._alias.get(prefix + k, prefix + k)].to(v.dtype) for k, v in wanted.items()}, strict=True, assign=True
        )

    def load_layer(self, index: int, where: Mapping[str, Path] | None = None) -> nn.Module:
        """Decoder layer `index` with its weights read from `where` (default: the checkpoint)."""
        block = self.layers[index]
        self.materialise(block, self.block_prefix(index), self.source if where is None else where)
        return block

    def release_layer(self, index: int) -> None:
        release(self.layers[index])

    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The output tensors of a materialised layer, by full name."""
        prefix = self.block_prefix(index)
        kept = set(self.output_keys)
        return {prefix + k: v for k, v in self.layers[index].state_dict().items() if prefix + k in kept}

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Output tensors `keys` from the checkpoint, cast to the model's dtypes as `from_pretrained` casts them."""
        dtypes = self.model.state_dict()
        tensors = read_tensors(self.source, [self._alias.get(k, k) for k in keys])
        return {k: tensors[self._alias.get(k, k)].to(dtypes[k].dtype) for k in keys}

    def rest_keys(self) -> list[str]:
        """Output tensor names outside the decoder layers (embeddings, final norm, head)."""
        return [k for k in self.output_keys if self.layer_index(k) is None]

    def rest_parts(self) -> dict[str, list[str]]:
        """{part name: output tensor names} of the tensors outside the decoder layers (embeddings, final norm, an untied
        head), in output order, packed into parts no larger than the largest of them. A part's tensors are all read
        (their pages of the checkpoint mapped) while it is written, so this peaks at one embedding table where one
        part of them all held two with an untied head."""
        shapes = self.model.state_dict()
        sizes = {k: shapes[k].numel() * shapes[k].element_size() for k in self.rest_keys()}
        keys = list(sizes)
        groups = pack_in_order(list(sizes.values()), max(sizes.values(), default=0))
        return {f"{REST_PART}-{i:05d}": [keys[k] for k in group] for i, group in enumerate(groups)}

    def write_rest(self, parts: PartialModelFolder) -> list[str]:
        """Write the `rest_parts` an interrupted run did not finish to `parts`, one at a time; returns their names."""
        rest = self.rest_parts()
        for part, keys in rest.items():
            if not parts.has(part):
                parts.write(part, self.read(keys))
        return list(rest)

    def _head_prefix(self) -> str | None:
        head = self.model.get_output_embeddings()
        return next((f"{n}." for n, m in self.model.named_modules() if m is head), None) if head is not None else None

    def load_outside(self) -> None:
        """Materialise everything outside the decoder layers but the output head: what runs before the first layer."""
        head = self._head_prefix()
        keys = [k for k in self.model.state_dict() if self.layer_index(k) is None and not (head and k.startswith(head))]
        self.model.load_state_dict(self.read(keys), strict=False, assign=True)

    def release_outside(self) -> None:
        head = self._head_prefix()
        meta = {
            k: torch.empty_like(v, device="meta")
            for k, v in self.model.state_dict().items()
            if self.layer_index(k) is None and not (head and k.startswith(head))
        }
        self.model.load_state_dict(meta, strict=False, assign=True)

    def save_configs(self) -> list[Any]:
        """The config objects `save_pretrained` writes (config.json with dtype and architectures, generation config)."""
        self.config.dtype = str(self.dtype).split(".")[1]
        self.config.architectures = [type(self.model).__name__]
        return [self.config, self.model.generation_config] if self.model.can_generate() else [self.config]

    def folder_sparsity(self, where: Mapping[str, Path], fingerprinted: Sequence[str] | None = None) -> tuple[SparsityReport, dict]:
        """(`sparsity_report`, mask fingerprint) of the model whose tensors `where` names, read one layer at a time.

        The report covers every linear layer but the output head, in the model's module order, as
        `sparsity_report(model)` does; the fingerprint covers `fingerprinted` (default: the same layers), as
        `sparsity.model_fingerprint(model, fingerprinted)` does.
        """
        chosen = None if fingerprinted is None else set(fingerprinted)
        head = self.model.get_output_embeddings()
        layers: list[LayerSparsity] = []

        def units() -> Iterator[tuple[str, nn.Module, Callable[[], None]]]:
            """(name prefix, module, its release) of each decoder layer and each linear layer outside them, in module
            order, the module read from `where` when reached."""
            for name, module in self.model.named_modules():
                index = self.layer_index(name)
                if index is not None and name + "." == self.block_prefix(index):
                    yield self.block_prefix(index), self.load_layer(index, where), functools.partial(self.release_layer, index)
                elif index is None and is_linear_like(module) and module is not head:
                    self.materialise(module, f"{name}.", where)
                    yield f"{name}.", module, functools.partial(release, module)

        def unit_weights(prefix: str, unit: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
            """Each linear layer's report entry, and its weight for the fingerprint: a copy, since the consumer keeps
            the last weight until its next one and a tensor read from a file keeps the file's whole mapping (the
            layer) in memory while it lives. Freed temporaries go back to the OS after each linear layer."""
            for name, module in unit.named_modules():
                if is_linear_like(module):
                    full = (prefix + name).rstrip(".")
                    layers.extend(replace(layer, name=full) for layer in sparsity_report(module).layers)
                    if chosen is None or full in chosen:
                        yield full, dense_weight(module).clone()
                    return_freed_memory()

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for prefix, unit, free in units():
                yield from unit_weights(prefix, unit)
                free()

        with single_threaded(torch.device("cpu")):  # threads' allocations of its temporaries pile up in their arenas
            fingerprint = fingerprint_modules(weights())
        return SparsityReport(layers), fingerprint


def _check_settings(method: str, sparsity: float | str, blocksize: int, percdamp: float, batch_size: int | None) -> SparsitySpec:
    """The checks `prune` makes on its settings, with its messages."""
    if method not in PRUNING_METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; choose one of {list(PRUNING_METHODS)}.")
    spec = parse_sparsity(sparsity)
    if method == "sparsegpt" and (blocksize < 1 or not 0 <= percdamp < 1):
        raise ValueError(f"SparseGPT needs blocksize >= 1 and 0 <= percdamp < 1 (got {blocksize}, {percdamp}).")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size}).")
    return spec


def _checkpoint_tokenizer(folder: Path) -> Any | None:
    """The checkpoint's tokenizer, or None when it has none."""
    if not any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _trimmed(make_stats: Callable, prune_module: Callable) -> tuple[Callable, Callable]:
    """The method's functions, its per-module step followed by `return_freed_memory` (SparseGPT's workspace of a wide
    layer, several Hessian-sized matrices, would otherwise stay resident under the next module's)."""

    def prune_and_trim(name: str, weight: torch.Tensor, stats: Any) -> None:
        prune_module(name, weight, stats)
        return_freed_memory()

    return make_stats, prune_and_trim


def _calibration(
    ckpt: StreamedCheckpoint, model: str, calibration: Any, tokenizer: Any | None, nsamples: int, seqlen: int, seed: int
) -> CalibrationData:
    """The calibration windows, checked against the model's vocabulary as `prune` checks them."""
    if tokenizer is None and not isinstance(calibration, torch.Tensor):
        raise ValueError(f"Calibration text needs a tokenizer and {model} has none: pass tokenizer=.")
    calib = load_calibration(calibration, tokenizer, nsamples, seqlen, seed)
    return_freed_memory()  # what tokenizing a corpus allocated, before the first layer is read
    vocab = ckpt.model.get_input_embeddings().num_embeddings
    if int(calib.input_ids.max()) >= vocab or int(calib.input_ids.min()) < 0:
        raise ValueError(f"Calibration token ids fall outside the model's vocabulary of {vocab}: wrong tokenizer?")
    return calib


def _run_key(ckpt: StreamedCheckpoint, settings: dict[str, Any], calib: CalibrationData | None) -> str:
    """A hash of everything the pruned tensors depend on: the checkpoint's files, the settings, the calibration
    tokens, and the versions of spp-hf and torch. A resumed run reuses finished layers only under the same key."""
    files = sorted({path for path in ckpt.source.values()} | {ckpt.folder / "config.json"})
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    digest = hashlib.sha256(json.dumps([stamp, settings, str(ckpt.dtype), __version__, torch.__version__], default=str).encode())
    if calib is not None:
        digest.update(calib.input_ids.numpy().tobytes())
    return digest.hexdigest()[:32]


def _start_calibration(
    ckpt: StreamedCheckpoint, calib: CalibrationData, device: torch.device | str | None, batch_size: int | None, keep_first: bool
) -> BlockInputs:
    """Capture the first layer's inputs with the embeddings and the (unpruned) first layer loaded, free the
    embeddings, choose the batches on the first layer, then free it unless `keep_first` (it is pruned next: read
    once). The embeddings (and the pages of the checkpoint they were read from) are gone before any layer runs."""
    work_device = torch.device(device or "cpu")
    first = ckpt.load_layer(0)
    try:
        ckpt.load_outside()
        try:
            call = capture_layer_inputs(ckpt.model, first, calib.input_ids, work_device)
        finally:
            ckpt.release_outside()
            return_freed_memory()
        state = calibration_batches(first, call, work_device, batch_size)
        return_freed_memory()  # the batching check's two forward passes
    except BaseException:
        ckpt.release_layer(0)
        raise
    if not keep_first:
        ckpt.release_layer(0)
    return state


@torch.no_grad()
def _prune_layers(
    ckpt: StreamedCheckpoint,
    parts: PartialModelFolder,
    spec: SparsitySpec,
    selected: set[str],
    calib: CalibrationData | None,
    method_fns: tuple[Callable, Callable] | None,
    device: torch.device | str | None,
    batch_size: int | None,
    progress: bool,
    desc: str,
) -> None:
    """Prune every decoder layer not yet in `parts` and write it there; finished layers are only run forward."""
    count = len(ckpt.layers)
    first = next((i for i in range(count) if not parts.has(layer_part(i))), count)
    state = _start_calibration(ckpt, calib, device, batch_size, first == 0) if calib is not None and first < count else None
    work_device = torch.device(device or "cpu")
    for index in tqdm(range(count), desc=desc, unit="layer", disable=not progress):
        done = index < first  # finished by an interrupted run: only its outputs are needed, as the next layer's inputs
        if done and state is None:
            continue
        if index == 0 and state is not None and first == 0:
            block = ckpt.layers[0]  # still loaded from the calibration start
        else:
            block = ckpt.load_layer(index, part_files(parts, [layer_part(index)]) if done else None)
        block = block.to(work_device)
        if not done:
            name = block_name(ckpt.layers_name, index)
            if state is not None:
                prune_block(block, name, state, selected.__contains__, *method_fns)
            else:
                with single_threaded(work_device):
                    for module in block_targets(block, name, selected.__contains__).values():
                        prune_magnitude_(dense_weight(module), spec)
            parts.write(layer_part(index), ckpt.layer_tensors(index))
        if state is not None and index + 1 < count:
            advance(block, state)
            return_freed_memory()
        ckpt.release_layer(index)


@torch.no_grad()
@large_frees_returned()
def prune_to_folder(
    model: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "wanda",
    sparsity: float | str = 0.5,
    calibration: str | os.PathLike | Any | None = None,
    tokenizer: Any | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    modules: Sequence[str] | str | None = None,
    device: torch.device | str | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    progress: bool = True,
    batch_size: int | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> PruneReport:
    """Prune the checkpoint `model` (local folder or Hub id, safetensors) layer by layer into the pruned base `out`.

    The same settings and the same result as `prune(AutoModelForCausalLM.from_pretrained(model, dtype=dtype), ...)`
    followed by `save_pruned(model, tokenizer, out, report)`, holding one decoder layer and the calibration
    activations at a time (the embeddings only while the first layer's inputs are captured; see the module
    docstring). `dtype` is the dtype to prune in
    (default: as saved, like `from_pretrained`). `tokenizer` (default: the checkpoint's) tokenizes the calibration
    text and is saved with the model. Output shards hold whole decoder layers, packed up to `max_shard_size`.
    Started again after a crash with the same arguments, it resumes at the first layer not finished. `out` must be
    new, empty or an earlier pruned base; everything is checked before the first layer is read.
    """
    start = time.perf_counter()
    spec = _check_settings(method, sparsity, blocksize, percdamp, batch_size)
    shard_bytes = parse_size(max_shard_size)
    check_model_folder_target(out, "pruned-base")  # before anything is read
    folder = local_checkpoint(model, revision, token)
    ckpt = StreamedCheckpoint(folder, dtype)
    targets = select_modules(ckpt.model, modules)
    for name, module in targets:
        spec.check_in_features(name, in_out_features(module)[0])
    tokenizer = tokenizer if tokenizer is not None else _checkpoint_tokenizer(folder)
    calib = None if method == "magnitude" else _calibration(ckpt, str(model), calibration, tokenizer, nsamples, seqlen, seed)
    names = [name for name, _ in targets]
    settings = {"method": method, "sparsity": str(spec), "modules": names, "blocksize": blocksize, "percdamp": percdamp,
                "batch_size": batch_size or batch_size_for(seqlen, block=ckpt.layers[0]),  # the rule's choice too
                "device": torch.device(device or "cpu").type}  # fmt: skip
    parts = PartialModelFolder(out, "pruned-base", _run_key(ckpt, settings, calib))
    rest = ckpt.write_rest(parts)
    with _calibration_mode(ckpt.model):
        method_fns = _trimmed(*_method_fns(method, spec, blocksize, percdamp)) if calib is not None else None
        _prune_layers(ckpt, parts, spec, set(names), calib, method_fns, device, batch_size, progress, f"{method} {spec} (streamed)")
    part_names = [*rest, *(layer_part(i) for i in range(len(ckpt.layers)))]
    full, fingerprint = ckpt.folder_sparsity(part_files(parts, part_names), names)
    report = PruneReport(
        method=method, sparsity=str(spec), calibration=calib.description if calib else None,
        nsamples=nsamples if calib else None, seqlen=seqlen if calib else None, seed=seed if calib else None,
        seconds=time.perf_counter() - start, modules=names, stats=SparsityReport([l for l in full.layers if l.name in set(names)]),
        base_model=str(model), extra={"blocksize": blocksize, "percdamp": percdamp} if method == "sparsegpt" else {},
    )  # fmt: skip
    record = {"format_version": SPARSITY_FORMAT_VERSION, "kind": "pruned-base", **full.to_dict(), **report.to_dict(),
              "perplexity": None, "mask_fingerprint": fingerprint}  # fmt: skip
    card = render_pruned_base_card(
        base_model=report.base_model or "", method=method, sparsity=report.sparsity,
        calibration=report.calibration or "none (magnitude pruning uses no data)", report=report.stats.to_dict(),
        perplexity=None, perplexity_dataset=None,
    )  # fmt: skip
    write_model_folder_from_parts(out, parts, part_names, ckpt.save_configs(), tokenizer, card, record, shard_bytes,
                                  ckpt.model.num_parameters())  # fmt: skip
    return report
