"""What `spp-hf inspect` reports: an adapter's config and base, a model folder's sparsity, and whether zeros match.

Works on any folder spp-hf writes (pruned base, SPP adapter, merged SPP or baseline model), local or
on the Hub: model folders are checked against the fingerprint their `sparsity.json` records, merged
models also against their base's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled
from transformers import AutoModelForCausalLM

from ..adapters.config import AdapterConfig
from ..adapters.kinds import kind_named
from ..sparsity import model_fingerprint, sparsity_report, zero_mask_differences
from ..storage import (
    ADAPTER_FILES,
    SPARSE_PEFT_FILES,
    SPARSITY_NAME,
    PeftAdapterFiles,
    read_adapter_folder,
    read_sparsity_json,
    sparsity_fingerprint,
)
from .cards import fingerprint_report, sparse_peft_label
from .transfer import KIND_HINT_FILES, SPPHubError, describe_folder, explain_hub_error, fetch_sparsity_json, is_adapter_root


@dataclass
class Inspection:
    """What `spp-hf inspect` found about an adapter, a pruned base or a merged model."""

    target: str
    kind: str
    location: str
    config: dict[str, Any] | None = None
    base: str | None = None
    base_revision: str | None = None
    fingerprint: str | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    ratio: float | None = None
    pattern: str | None = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["checks"] = [{"check": c, "passed": p, "detail": d} for c, p, d in self.checks]
        data["ok"] = self.ok
        return data

    def __str__(self) -> str:
        lines = [f"{self.kind}: {self.target}", f"  location     {self.location}"]
        if self.base:
            lines.append(f"  base         {self.base}" + (f" @ {self.base_revision}" if self.base_revision else ""))
        if self.fingerprint:
            lines.append(f"  fingerprint  {self.fingerprint}")
        if self.ratio is not None:
            lines.append(f"  sparsity     {100 * self.ratio:.2f}% zeros" + (f", {self.pattern}" if self.pattern else ""))
        if self.config:
            lines.append("  config       " + ", ".join(f"{k}={v}" for k, v in self.config.items() if k != "mask_fingerprint"))
        if self.layers:
            lines.append(f"  {'layer':<48} {'shape':>12} {'zeros':>10} {'ratio':>7} {'N:M':>6}")
            for layer in self.layers:
                shape = "x".join(map(str, layer["shape"]))
                pattern = layer.get("pattern") or "-"
                lines.append(f"  {layer['name']:<48} {shape:>12} {layer['zeros']:>10} {layer['ratio']:>7.4f} {pattern:>6}")
        for check, passed, detail in self.checks:
            lines.append(f"  [{'ok' if passed else 'FAIL'}] {check}: {detail}")
        return "\n".join(lines)


def inspect_target(target: str, revision: str | None = None, token: str | bool | None = None) -> Inspection:
    """Describe an adapter / pruned base / merged model (local folder or Hub repo) and check its zeros."""
    folder, location = _small_files(target, revision, token)
    if is_adapter_root(folder):
        return _inspect_adapter(target, folder, location)
    data = read_sparsity_json(folder / SPARSITY_NAME)  # from the small files: no weights needed yet
    folder = _with_weights(target, folder, revision, token)
    if data is not None and data.get("kind") in ("spp-merged", "merged"):
        return _inspect_merged(target, folder, location, data, token)
    return _inspect_model(target, folder, location, data)


def _small_files(target: str, revision: str | None, token: str | bool | None) -> tuple[Path, str]:
    local = Path(target).expanduser()
    if local.is_dir():
        return local, str(local.resolve())
    try:
        path = Path(snapshot_download(target, revision=revision, token=token, allow_patterns=[*ADAPTER_FILES, *SPARSE_PEFT_FILES, *KIND_HINT_FILES]))
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled) as err:
        raise SPPHubError(explain_hub_error(err, target, revision, token, role="repo")) from err
    return path, f"{target} @ {path.name}"


def _with_weights(target: str, folder: Path, revision: str | None, token: str | bool | None) -> Path:
    if Path(target).expanduser().is_dir():
        return folder
    return Path(snapshot_download(target, revision=revision, token=token, ignore_patterns=["*.bin", "*.pt", "*.pth", "*.gguf"]))


def _inspect_adapter(target: str, folder: Path, location: str) -> Inspection:
    """An adapter of either format (SPP's files, or a sparse-PEFT adapter's PEFT files and spp-hf's record)."""
    try:
        files, problem = read_adapter_folder(folder), None
    except (OSError, ValueError) as err:
        files, problem = None, str(err)
    if files is None:
        result = Inspection(target, describe_folder(folder), location)
        result.checks.append(("adapter weights", False, problem))
        return result
    if isinstance(files, PeftAdapterFiles):
        kind = f"sparse-PEFT {sparse_peft_label(files.record)} adapter"
        config = {**files.config, **{k: v for k, v in files.record.items() if k != "mask_fingerprint"}}
    else:
        parsed = AdapterConfig.from_file_data(files.config, folder)
        kind, config = f"{kind_named(parsed.method).label} adapter", parsed.to_dict()
    fingerprint = files.mask_fingerprint or {}
    report = fingerprint_report(fingerprint)
    result = Inspection(
        target, kind, location, config=config, base=files.base[0], base_revision=files.base[1],
        fingerprint=fingerprint.get("hash"), layers=report["layers"], ratio=report["ratio"] if report["layers"] else None,
    )  # fmt: skip
    result.checks.append(("adapter weights", True, f"{len(files.tensors)} tensors, saved with this config"))
    detail = "recorded" if fingerprint else "not recorded: the adapter loads onto any base unchecked"
    result.checks.append(("base mask fingerprint", bool(fingerprint), detail))
    return result


def _weights_fingerprint(folder: Path) -> tuple[dict, dict]:
    """Sparsity report and mask fingerprint measured on the weights of a saved transformers model."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    with torch.no_grad():
        return sparsity_report(model).to_dict(), model_fingerprint(model)


def _inspect_model(target: str, folder: Path, location: str, data: dict | None) -> Inspection:
    report, found = _weights_fingerprint(folder)
    kind = "pruned base" if data is not None else "model (no sparsity.json)"
    result = Inspection(target, kind, location, base=(data or {}).get("base_model"), fingerprint=found["hash"],
                        layers=report["layers"], ratio=report["ratio"], pattern=report["pattern"])  # fmt: skip
    _check_recorded(result, data, found)
    return result


def _check_recorded(result: Inspection, data: dict | None, found: dict) -> None:
    """The weights have the zeros their own sparsity.json records."""
    recorded = sparsity_fingerprint(data)
    if recorded is None:
        detail = (f"no {SPARSITY_NAME} with a mask fingerprint, so there is nothing to check the zeros against; "
                  "folders written by spp-hf (prune, merge, run, publish) have one")  # fmt: skip
        result.checks.append(("weights match sparsity.json", False, detail))
    else:
        problems = zero_mask_differences(recorded, found)
        detail = "; ".join(problems[:3]) or f"{len(recorded['modules'])} layers"
        result.checks.append(("weights match sparsity.json", not problems, detail))


def _inspect_merged(target: str, folder: Path, location: str, data: dict, token: str | bool | None) -> Inspection:
    report, found = _weights_fingerprint(folder)
    base, base_rev = data.get("base_model"), data.get("base_model_revision")
    kind = "SPP-merged model" if data.get("kind") == "spp-merged" else "merged model"
    result = Inspection(target, kind, location, config=data.get("spp_config"), base=base,
                        base_revision=base_rev, fingerprint=found["hash"], layers=report["layers"],
                        ratio=report["ratio"], pattern=report["pattern"])  # fmt: skip
    _check_recorded(result, data, found)
    reference, source = None, None
    if base:
        reference = sparsity_fingerprint(fetch_sparsity_json(base, base_rev, token))
        source = f"sparsity.json of {base}" if reference else None
    if reference is None and data.get("base_mask_fingerprint"):
        reference, source = data["base_mask_fingerprint"], "the base fingerprint recorded at merge time"
    if reference is None:
        result.checks.append(("has the base's zeros", False, "no base fingerprint reachable to compare against"))
        return result
    problems = zero_mask_differences(reference, found)
    detail = "; ".join(problems[:3]) if problems else f"all {len(reference['modules'])} layers match {source}"
    result.checks.append(("has the base's zeros", not problems, detail))
    return result
