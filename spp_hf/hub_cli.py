"""`spp-hf push`, `spp-hf merge` and `spp-hf inspect`: publish, merge and check adapters, pruned bases and merged models."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import CONFIG_NAME, SPPConfig
from .hub import (
    ADAPTER_FILES,
    KIND_HINT_FILES,
    SPARSITY_NAME,
    SPPHubError,
    describe_folder,
    explain_hub_error,
    fetch_sparsity_json,
    merge_to_folder,
    push_folder,
    read_sparsity_json,
    sparsity_fingerprint,
)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    push = subparsers.add_parser("push", help="upload a saved adapter, pruned base or merged model to the Hub")
    push.add_argument("folder", help="folder written by save_pretrained / spp-hf prune / spp-hf merge")
    push.add_argument("repo_id", help="namespace/name of the Hub repo (created if missing)")
    _hub_args(push, revision_help="branch to push to (created from main if missing)")
    push.add_argument("--commit-message", default=None)
    push.set_defaults(func=_run_push)

    merge = subparsers.add_parser("merge", help="merge an SPP adapter into its pruned base (zeros kept) and save it")
    merge.add_argument("adapter", help="adapter folder or Hub repo id")
    merge.add_argument("--out", required=True, help="folder for the merged model (must not exist or be empty)")
    merge.add_argument("--base", default=None, help="pruned base to merge into (default: the one the adapter names)")
    merge.add_argument("--base-revision", default=None, help="revision of --base (default: the adapter's pinned one)")
    merge.add_argument("--dtype", default=None, help="torch dtype of the base, e.g. float32, bfloat16 (default: as saved)")
    merge.add_argument("--eval-results", default=None, help="JSON file {data: {metric: value}} for the card's model-index")
    merge.add_argument("--dataset", default=None, help="dataset the adapter was trained on (for the card)")
    merge.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the merged folder to this repo")
    _hub_args(merge, revision_help="revision of the adapter repo")
    merge.set_defaults(func=_run_merge)

    inspect = subparsers.add_parser("inspect", help="show config, base, fingerprint and per-layer sparsity; verify zeros")
    inspect.add_argument("target", metavar="REPO_OR_DIR", help="adapter, pruned base or merged model (folder or repo id)")
    _hub_args(inspect, revision_help="revision of the repo", private=False)
    inspect.add_argument("--json", action="store_true", help="print the result as JSON")
    inspect.set_defaults(func=_run_inspect)


def _hub_args(parser: argparse.ArgumentParser, revision_help: str, private: bool = True) -> None:
    parser.add_argument("--revision", default=None, help=revision_help)
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    if private:
        parser.add_argument("--private", action="store_true", help="create the repo as private")


# --------------------------------------------------------------------------- push / merge
def _run_push(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    kind = describe_folder(folder)
    if not (folder / "README.md").is_file():
        print(f"warning: {folder} has no README.md; the repo will have no model card.", file=sys.stderr)
    allow = [*ADAPTER_FILES, f"*/{CONFIG_NAME}", "*/spp_adapter.safetensors"] if kind == "SPP adapter" else None
    commit = push_folder(folder, args.repo_id, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, token=args.token, allow_patterns=allow)  # fmt: skip
    print(f"pushed {kind} {folder} -> {args.repo_id}: {commit}")
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    eval_results = json.loads(Path(args.eval_results).read_text()) if args.eval_results else None
    out = merge_to_folder(
        args.adapter, args.out, base_model=args.base, base_revision=args.base_revision, revision=args.revision,
        token=args.token, torch_dtype=args.dtype, eval_results=eval_results, dataset_name=args.dataset,
        push_to_hub=args.push_to_hub, private=args.private,
    )  # fmt: skip
    print(f"merged {args.adapter} -> {out}" + (f" (pushed to {args.push_to_hub})" if args.push_to_hub else ""))
    return 0


# --------------------------------------------------------------------------- inspect
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
    if (folder / CONFIG_NAME).is_file():
        return _inspect_adapter(target, folder, location)
    data = read_sparsity_json(folder / SPARSITY_NAME)
    folder = _with_weights(target, folder, revision, token)
    if data is not None and data.get("kind") == "spp-merged":
        return _inspect_merged(target, folder, location, data, token)
    return _inspect_model(target, folder, location, data)


def _small_files(target: str, revision: str | None, token: str | bool | None) -> tuple[Path, str]:
    local = Path(target).expanduser()
    if local.is_dir():
        return local, str(local.resolve())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    try:
        path = Path(snapshot_download(target, revision=revision, token=token, allow_patterns=[*ADAPTER_FILES, *KIND_HINT_FILES]))
    except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled) as err:
        raise SPPHubError(explain_hub_error(err, target, revision, token, role="repo")) from err
    return path, f"{target} @ {path.name}"


def _with_weights(target: str, folder: Path, revision: str | None, token: str | bool | None) -> Path:
    if Path(target).expanduser().is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(target, revision=revision, token=token, ignore_patterns=["*.bin", "*.pt", "*.pth", "*.gguf"]))


def _inspect_adapter(target: str, folder: Path, location: str) -> Inspection:
    from .cards import _fingerprint_report

    config = SPPConfig.from_json_file(folder / CONFIG_NAME)
    fingerprint = config.mask_fingerprint or {}
    report = _fingerprint_report(fingerprint)
    result = Inspection(
        target, "SPP adapter", location, config=config.to_dict(), base=config.base_model_name_or_path,
        base_revision=config.base_model_revision, fingerprint=fingerprint.get("hash"), layers=report["layers"],
        ratio=report["ratio"] if report["layers"] else None,
    )  # fmt: skip
    weights = folder / "spp_adapter.safetensors"
    result.checks.append(("adapter weights", weights.is_file(), "present" if weights.is_file() else f"{weights.name} missing"))
    detail = "recorded" if fingerprint else "not recorded: the adapter loads onto any base unchecked"
    result.checks.append(("base mask fingerprint", bool(fingerprint), detail))
    return result


def _weights_fingerprint(folder: Path) -> tuple[dict, dict]:
    """Sparsity report and mask fingerprint measured on the weights of a saved transformers model."""
    import torch
    from transformers import AutoModelForCausalLM

    from .sparsity import fingerprint_modules, iter_linear_weights, sparsity_report

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    with torch.no_grad():
        return sparsity_report(model).to_dict(), fingerprint_modules(iter_linear_weights(model))


def _inspect_model(target: str, folder: Path, location: str, data: dict | None) -> Inspection:
    report, found = _weights_fingerprint(folder)
    kind = "pruned base" if data is not None else "model (no sparsity.json)"
    result = Inspection(target, kind, location, base=(data or {}).get("base_model"), fingerprint=found["hash"],
                        layers=report["layers"], ratio=report["ratio"], pattern=report["pattern"])  # fmt: skip
    recorded = sparsity_fingerprint(data)
    if recorded is not None:
        problems = compare_zero_masks(recorded, found)
        detail = "; ".join(problems[:3]) or f"{len(recorded['modules'])} layers"
        result.checks.append(("weights match sparsity.json", not problems, detail))
    return result


def _inspect_merged(target: str, folder: Path, location: str, data: dict, token: str | bool | None) -> Inspection:
    report, found = _weights_fingerprint(folder)
    base, base_rev = data.get("base_model"), data.get("base_model_revision")
    result = Inspection(target, "SPP-merged model", location, config=data.get("spp_config"), base=base,
                        base_revision=base_rev, fingerprint=found["hash"], layers=report["layers"],
                        ratio=report["ratio"], pattern=report["pattern"])  # fmt: skip
    reference, source = None, None
    if base:
        reference = sparsity_fingerprint(fetch_sparsity_json(base, base_rev, token))
        source = f"sparsity.json of {base}" if reference else None
    if reference is None and data.get("base_mask_fingerprint"):
        reference, source = data["base_mask_fingerprint"], "the base fingerprint recorded at merge time"
    if reference is None:
        result.checks.append(("has the base's zeros", False, "no base fingerprint reachable to compare against"))
        return result
    problems = compare_zero_masks(reference, found)
    detail = "; ".join(problems[:3]) if problems else f"all {len(reference['modules'])} layers match {source}"
    result.checks.append(("has the base's zeros", not problems, detail))
    return result


def compare_zero_masks(reference: dict, found: dict) -> list[str]:
    """Layers of `reference` whose zero mask differs in `found` (both `fingerprint_modules` outputs)."""
    problems = []
    for name, ref in reference.get("modules", {}).items():
        got = found.get("modules", {}).get(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif list(got["shape"]) != list(ref["shape"]):
            problems.append(f"{name}: shape {got['shape']} != {ref['shape']}")
        elif got["hash"] != ref["hash"]:
            problems.append(f"{name}: zero mask differs ({got['zeros']} zeros, base has {ref['zeros']})")
    return problems


def _run_inspect(args: argparse.Namespace) -> int:
    result = inspect_target(args.target, revision=args.revision, token=args.token)
    print(json.dumps(result.to_dict(), indent=2, default=str) if args.json else result)
    return 0 if result.ok else 1

