"""`publish_run`: push a whole `spp-hf run` folder to the Hub as repos that name each other.

    runs/<name>/pruned                  -> ORG/NAME                (pruned base)
    runs/<name>/spp_s0/adapter          -> ORG/NAME-spp            (adapter re-keyed to ORG/NAME at the pushed commit)
    runs/<name>/spp_s0/merged           -> ORG/NAME-spp-merged     (with merged=True)
    runs/<name>/<entry>_s<seed>/merged  -> ORG/NAME-<entry>-merged (other trained methods, e.g. lora_star)

The folders are found through the run layout (`spp_hf.pipeline.layout`). An entry trained at several seeds
keeps the seed in its repo names (ORG/NAME-spp_s1, ...).

Everything is checked before the first push: the adapter and every merged model have the pruned
base's zeros. Between the pushes the adapter is keyed to the base commit just pushed, after checking
the mask fingerprint the Hub now serves there. Files that name local paths (sparsity.json, cards,
the adapter config) are rewritten for the Hub: the run's own folders by their repo ids, any other path
dropped by the one scrubber (`spp_hf.hub.paths`); the upload is refused if any file still holds a path
of this machine. The run folder itself is not changed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from ..adapters.config import AdapterConfig
from ..data.default_model import HUB_ID
from ..pipeline.layout import RunLayout
from ..sparsity import model_sparsity_record, zero_mask_differences
from ..storage import (
    MODEL_KINDS,
    README_NAME,
    SPARSITY_NAME,
    AdapterFiles,
    PeftAdapterFiles,
    is_sparse_peft_folder,
    json_bytes,
    read_adapter_folder,
    read_sparsity_json,
    sparsity_fingerprint,
    write_adapters,
)
from .cards import render_baseline_merged_card, render_merged_card, render_pruned_base_card
from .paths import is_hub_id, without_local_paths
from .transfer import SPPHubError, adapter_card, push_folder, verified_base

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class PublishedRepo:
    """One repo `publish_run` pushed: what it holds, from which folder, and the commit."""

    role: str
    folder: Path
    repo_id: str
    commit: str


@dataclass
class RunVariant:
    """One trained variant of a run: its folder, `methods:` entry and method, and the adapter / merged model it wrote."""

    folder: Path
    entry: str  # the `methods:` entry it was trained for (its folder name without the seed)
    method: str  # the registered method it trained with, as its records say (older runs: its entry)
    adapter: Path | None
    merged: Path | None


@dataclass
class RunArtifacts:
    """The publishable folders of a run."""

    pruned: Path
    variants: dict[str, RunVariant]  # repo-name suffix ("spp", "lora_star", "spp_s1", ...) -> variant
    dense_model: str | None  # the Hub id of the model that was pruned, when the run names one


def run_artifacts(run_dir: str | os.PathLike) -> RunArtifacts:
    """Find the pruned base and every variant's adapter and merged model in a run folder (`spp_hf.pipeline.layout`)."""
    layout = RunLayout(Path(run_dir))
    if read_sparsity_json(layout.pruned) is None:
        raise FileNotFoundError(
            f"{layout.pruned} has no {SPARSITY_NAME}: {layout.root} is not a finished `spp-hf run` folder. Run `spp-hf run` "
            "first, or push single folders with `spp-hf push`."
        )
    found = [_run_variant(layout, name) for name in layout.trained_variants()]
    entries = [v.entry for v in found]
    variants = {(v.entry if entries.count(v.entry) == 1 else v.folder.name): v for v in found}
    return RunArtifacts(layout.pruned, variants, _dense_model(layout))


def _run_variant(layout: RunLayout, name: str) -> RunVariant:
    adapter = layout.adapter(name) if layout.has_adapter(name) or is_sparse_peft_folder(layout.adapter(name)) else None
    merged = layout.merged(name) if layout.has_merged(name) else None
    entry = RunLayout.entry_of(name)
    return RunVariant(layout.variant(name), entry, _recorded_method(layout, name, merged) or entry, adapter, merged)


def _recorded_method(layout: RunLayout, name: str, merged: Path | None) -> str | None:
    """The method the variant's merged sparsity.json or training metrics record (runs before they did: None)."""
    metrics = layout.train_metrics(name)
    for record in (read_sparsity_json(merged) if merged else None, _read_json(metrics) if metrics.is_file() else None):
        if isinstance(record, dict) and record.get("method"):
            return str(record["method"])
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dense_model(layout: RunLayout) -> str | None:
    name = (_read_json(layout.config) or {}).get("model")
    if name == "smollm2":
        return HUB_ID
    return name if is_hub_id(name) else None


def publish_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    merged: bool = True,
    private: bool | None = False,
    token: str | bool | None = None,
    dense_model: str | None = None,
) -> list[PublishedRepo]:
    """Push a run's pruned base, SPP adapter and (with `merged`) merged models; see the module docstring.

    `dense_model` is the Hub id of the model that was pruned, for the base's card (default: the run's
    `model` setting when it is a Hub id or 'smollm2').
    """
    run = Path(run_dir)
    found = run_artifacts(run)
    dense = dense_model or found.dense_model
    names = _repo_names(repo_id, found, merged)
    base_data = read_sparsity_json(found.pruned)
    base_fp = sparsity_fingerprint(base_data)
    if base_fp is None:
        raise ValueError(f"{found.pruned / SPARSITY_NAME} records no mask fingerprint; prune again with spp-hf.")
    adapters = {suffix: _checked_adapter(v.adapter, found.pruned, base_fp) for suffix, v in found.variants.items() if v.adapter}
    records = {suffix: _merged_record(v.merged, v.method, base_fp) for suffix, v in found.variants.items() if v.merged and merged}
    known = _known_paths(found, names, base_data, dense)
    roots = _local_roots(run)
    published = []
    with tempfile.TemporaryDirectory(prefix="spp-publish-") as tmp:
        mirror = _base_mirror(found.pruned, Path(tmp) / "pruned", base_data, dense, names, known, roots)
        commit = push_folder(mirror, repo_id, private=private, token=token, commit_message="Upload pruned base with spp-hf")
        published.append(PublishedRepo("pruned base", found.pruned, repo_id, commit.oid))
        for suffix, adapter in adapters.items():
            sha = verified_base(repo_id, commit.oid, adapter.mask_fingerprint, token)
            mirror = _adapter_mirror(adapter, Path(tmp) / suffix, names, suffix, sha, known, roots)
            pushed = push_folder(mirror, names[suffix], private=private, token=token, commit_message=f"Upload {suffix} adapter")
            published.append(PublishedRepo(f"{suffix} adapter", found.variants[suffix].adapter, names[suffix], pushed.oid))
        for suffix, record in records.items():
            variant, own = found.variants[suffix], f"{suffix}-merged"
            mirror = _merged_mirror(variant, Path(tmp) / own, suffix, record, names, commit.oid, known, roots)
            pushed = push_folder(mirror, names[own], private=private, token=token, commit_message=f"Upload merged {suffix} model")
            published.append(PublishedRepo(f"merged {suffix} model", variant.merged, names[own], pushed.oid))
    return published


def _checked_adapter(folder: Path, pruned: Path, base_fp: dict) -> AdapterFiles | PeftAdapterFiles:
    """An adapter's files (SPP's or sparse PEFT's), refused unless it was trained on the run's pruned base."""
    files = read_adapter_folder(folder)
    problems = zero_mask_differences(files.mask_fingerprint or {}, base_fp)
    if problems or not files.mask_fingerprint:
        raise ValueError(
            f"The adapter {folder} was not trained on {pruned} ({'; '.join(problems[:3]) or 'no mask fingerprint'}); "
            "nothing was pushed. Publish a run whose adapters were trained on its own pruned base."
        )
    return files


def _repo_names(repo_id: str, found: RunArtifacts, merged: bool) -> dict[str, str]:
    """Keys "base", "<suffix>" (adapters) and "<suffix>-merged" -> repo ids."""
    if not is_hub_id(repo_id) or "/" not in repo_id:
        raise ValueError(f"{repo_id!r} is not a Hub repo id; pass ORG/NAME (the base's repo; the others get suffixes).")
    names = {"base": repo_id}
    for suffix, variant in found.variants.items():
        if variant.adapter:
            names[suffix] = f"{repo_id}-{suffix}"
        if variant.merged and merged:
            names[f"{suffix}-merged"] = f"{repo_id}-{suffix}-merged"
    return names


def _related(names: dict[str, str], own: str) -> list[tuple[str, str]]:
    def label(key: str) -> str:
        if key == "base":
            return "Pruned base"
        return f"Merged {key.removesuffix('-merged')} model" if key.endswith("-merged") else f"{key} adapter"

    return [(label(key), repo) for key, repo in names.items() if key != own]


def _merged_record(folder: Path, method: str, base_fp: dict) -> dict:
    """sparsity.json of a merged model as measured on its weights, refused if its zeros are not the base's."""
    saved = read_sparsity_json(folder) or {}
    kind = saved["kind"] if saved.get("kind") in MODEL_KINDS else ("spp-merged" if method == "spp" else "merged")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    try:
        record = model_sparsity_record(model, kind, base_mask_fingerprint=base_fp)
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None
    return {**saved, **record, "method": method}


def _local_roots(run: Path) -> set[str]:
    roots = {str(run.resolve()), str(Path.cwd().resolve()), str(Path.home().resolve())}
    return {r for r in roots if r != os.sep}


def _known_paths(found: RunArtifacts, names: dict[str, str], base_data: dict, dense: str | None) -> dict[str, str | None]:
    """{resolved local path: what the Hub calls it}: the run's folders by their repo ids, the dense model by its Hub id."""
    known: dict[str, str | None] = {str(found.pruned.resolve()): names["base"]}
    if base_data.get("base_model"):
        known[str(Path(base_data["base_model"]).expanduser().resolve())] = dense
    for suffix, variant in found.variants.items():
        if variant.adapter and suffix in names:
            known[str(variant.adapter.resolve())] = names[suffix]
        if variant.merged and f"{suffix}-merged" in names:
            known[str(variant.merged.resolve())] = names[f"{suffix}-merged"]
    return known


def _public(value: Any, known: dict[str, str | None]) -> Any:
    """JSON data fit for the Hub: strings naming a `known` path become its public name, and every other path of
    this machine is dropped by the one scrubber (`spp_hf.hub.paths.without_local_paths`)."""
    return without_local_paths(_named(value, known))[0]


def _named(value: Any, known: dict[str, str | None]) -> Any:
    if isinstance(value, dict):
        return {k: _named(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [_named(v, known) for v in value]
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        if path.is_absolute() or path.exists():
            return known.get(str(path.resolve()), value)
    return value


def _mirror(folder: Path, mirror: Path, replaced: dict[str, bytes], roots: set[str]) -> Path:
    """A folder of symlinks to `folder`'s files plus the `replaced` files, checked to hold no local path."""
    mirror.mkdir(parents=True)
    for item in folder.iterdir():
        if item.is_file() and not item.name.startswith(".") and item.name not in replaced:
            os.symlink(item.resolve(), mirror / item.name)
    for name, data in replaced.items():
        (mirror / name).write_bytes(data)
    for item in mirror.iterdir():
        if item.name.endswith(WEIGHT_SUFFIXES):
            continue
        text = item.read_bytes().decode("utf-8", errors="replace")
        leaked = sorted(root for root in roots if root in text)
        if leaked:
            raise SPPHubError(
                f"{folder / item.name} names the local path {leaked[0]!r}, which would be published; nothing more was "
                "pushed. Re-save that folder with spp-hf, or remove the path from the file."
            )
    return mirror


def _base_mirror(folder: Path, mirror: Path, data: dict, dense: str | None, names: dict, known: dict, roots: set[str]) -> Path:
    public = {**_public(data, known), "base_model": dense}
    card = render_pruned_base_card(
        dense or "", public.get("method", "?"), str(public.get("sparsity", "?")), str(public.get("calibration") or "none"),
        public, public.get("perplexity"), repo_id=names["base"], perplexity_dataset=public.get("perplexity_dataset"),
        related=_related(names, "base"),
    )  # fmt: skip
    return _mirror(folder, mirror, {SPARSITY_NAME: json_bytes(public), README_NAME: card.encode()}, roots)


def _adapter_mirror(
    adapter: AdapterFiles | PeftAdapterFiles, mirror: Path, names: dict, suffix: str, sha: str, known: dict, roots: set[str]
) -> Path:
    public = _public_files(adapter, known).rekeyed(names["base"], sha)
    public.card = adapter_card(public, names[suffix], related=_related(names, suffix))
    write_adapters(mirror, {"": public})
    return _mirror(mirror, mirror.parent / f"{suffix}-checked", {}, roots)


def _public_files(files: AdapterFiles | PeftAdapterFiles, known: dict) -> AdapterFiles | PeftAdapterFiles:
    """An adapter's files with its config (and a sparse-PEFT adapter's record) fit for the Hub (`_public`)."""
    if isinstance(files, PeftAdapterFiles):
        return PeftAdapterFiles(_public(files.config, known), _public(files.record, known), files.tensors)
    return AdapterFiles(_public(files.config, known), files.tensors)


def _merged_mirror(
    variant: RunVariant, mirror: Path, suffix: str, record: dict, names: dict, base_sha: str, known: dict, roots: set[str]
) -> Path:
    own = f"{suffix}-merged"
    record = {**_public(record, known), "base_model": names["base"], "base_model_revision": base_sha}
    if variant.adapter is not None and suffix in names and not is_sparse_peft_folder(variant.adapter):
        adapter_config = _public(read_adapter_folder(variant.adapter).config, known)
        config = AdapterConfig.from_dict({**adapter_config, "base_model_name_or_path": names["base"], "base_model_revision": base_sha})
        record.update(adapter=names[suffix], spp_config=config.to_dict())
        card = render_merged_card(config, record, repo_id=names[own], adapter=names[suffix], related=_related(names, own))
    else:
        card = render_baseline_merged_card(variant.method, names["base"], record, repo_id=names[own], related=_related(names, own))
    return _mirror(variant.merged, mirror, {SPARSITY_NAME: json_bytes(record), README_NAME: card.encode()}, roots)
