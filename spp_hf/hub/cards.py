"""Model cards for what spp-hf publishes: a pruned base, an SPP adapter, and a merged model.

Each card is rendered with `huggingface_hub.ModelCard.from_template` from a Jinja template in
`spp_hf/hub/card_templates/`, and its YAML metadata is built as a
`ModelCardData`, so it follows the Hub's schema: `base_model` (+ `base_model_relation`),
`library_name`, `tags` (spp, sparse, pruned, method, pattern), `datasets`, `license` (inherited
from the base when it can be read), `model-index` when evaluation results are given.

The usage snippet names the repo the card is pushed to; when that is not known yet the card says
`PLACEHOLDER_REPO_ID`, which `spp_hf.hub.transfer.push_folder` replaces with the repo id it pushes to.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
import transformers
from huggingface_hub import (
    EvalResult,
    ModelCard,
    ModelCardData,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    try_to_load_from_cache,
)

from ..adapters.config import AdapterConfig
from ..adapters.kinds import KINDS, kind_named
from ..data.corpora import BUNDLED
from ..sparsity import PRUNING_METHODS, SparsityReport, sparsity_report
from ..version import __version__
from .paths import is_hub_id

PLACEHOLDER_REPO_ID = "<this-repo-id>"
SPP_URL = "https://github.com/Lucky-Lance/SPP"


# --------------------------------------------------------------------------- public API
def render_pruned_base_card(
    base_model: str,
    method: str,
    sparsity: str,
    calibration: str,
    report: Any,
    perplexity: float | None = None,
    *,
    repo_id: str | None = None,
    perplexity_dataset: str | None = None,
    eval_results: dict | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's metadata field name
    related: list[tuple[str, str]] | None = None,
) -> str:
    """Card of a pruned base: the dense model it came from, method, sparsity, calibration, per-layer sparsity.

    `report` is `SparsityReport.to_dict()`. `perplexity` (measured after pruning) goes in the body, and
    also in `model-index` when `perplexity_dataset` names the data it was measured on.
    """
    report = _report_dict(report)
    base_meta = base_metadata(base_model)
    pattern = report.get("pattern") or (sparsity if ":" in str(sparsity) else None)
    results = dict(eval_results or {})
    if perplexity is not None and perplexity_dataset:
        results.setdefault(perplexity_dataset, {})["perplexity"] = perplexity
    card_data = _card_data(
        base_model=base_model,
        relation="quantized",  # the Hub has no "pruned" relation; this lists the model among compressed variants
        library_name="transformers",
        license=license or base_meta.get("license"),
        tags=_tags(method, pattern),
        datasets=[calibration] if _is_dataset_id(calibration) else None,
        eval_results=results,
        model_name=repo_id or f"{_short(base_model)} ({method} {sparsity})",
    )
    return _render(
        "pruned_base",
        card_data,
        title=f"{base_model} pruned with {method} ({sparsity})",
        repo_id=repo_id or PLACEHOLDER_REPO_ID,
        base_link=_link(base_model),
        method=method,
        sparsity=sparsity,
        calibration=calibration,
        perplexity=_perplexity_cell(perplexity, perplexity_dataset),
        sparsity_summary=_summary(report),
        **_sparsity_rows(report),
        eval_rows=_eval_rows(results),
        related=_related(related),
        versions=_versions(),
    )


def render_adapter_card(
    config: AdapterConfig,
    model: Any = None,
    dataset_name: str | None = None,
    final_loss: float | None = None,
    training_args: dict | None = None,
    eval_results: dict | None = None,
    *,
    repo_id: str | None = None,
    license: str | None = None,  # noqa: A002
    related: list[tuple[str, str]] | None = None,
) -> str:
    """Card of an SPP adapter: its pruned base (pinned revision, mask fingerprint), sparsity, SPP/training settings.

    With `model` (the SPP model) the sparsity table is measured on its base weights; otherwise it
    comes from the zero counts in `config.mask_fingerprint`.
    """
    base = config.base_model_name_or_path
    base_meta = base_metadata(base, config.base_model_revision)
    modules = (config.mask_fingerprint or {}).get("modules")
    report = _model_report(model, modules) if model is not None else fingerprint_report(config.mask_fingerprint)
    pattern = report.get("pattern") or base_meta.get("pattern")
    results = dict(eval_results or {})
    settings = _adapter_settings(config) + [("Adapter parameters", f"{_adapter_params(config):,}")]
    if dataset_name:
        settings.append(("Dataset", f"`{dataset_name}`"))
    if final_loss is not None:
        settings.append(("Final training loss", f"{final_loss:.4f}"))
    settings += [(str(k), f"`{v}`") for k, v in sorted((training_args or {}).items()) if v is not None]
    kind = kind_named(config.method)
    title = f"{kind.label} adapter for {_short(base)}" if base else f"{kind.label} adapter"
    card_data = _card_data(
        base_model=base,
        relation="adapter",
        library_name="spp-hf",
        license=license or base_meta.get("license"),
        tags=_tags(base_meta.get("method"), pattern, extra=["spp-adapter"]),
        datasets=[dataset_name] if _is_dataset_id(dataset_name) else None,
        eval_results=results,
        model_name=repo_id or title,
    )
    description = kind.adapter_description.format(
        base_link=_link(base), num_layers=len((config.mask_fingerprint or {}).get("modules", {})),
        adapter_params=f"{_adapter_params(config):,}",
    )
    return _render(
        "adapter", card_data, **_adapter_fields(config, report, results, repo_id, related),
        title=title, description=description, training_settings=settings,
    )  # fmt: skip


def render_merged_card(
    adapter_config: AdapterConfig,
    report: Any,
    eval_results: dict | None = None,
    *,
    repo_id: str | None = None,
    adapter: str | None = None,
    dataset_name: str | None = None,
    license: str | None = None,  # noqa: A002
    related: list[tuple[str, str]] | None = None,
) -> str:
    """Card of a merged model: the pruned base + the adapter folded in, its (unchanged) sparsity, SPP settings.

    `report` is `SparsityReport.to_dict()` of the merged model; `adapter` names where the adapter came from.
    """
    report = _report_dict(report)
    base = adapter_config.base_model_name_or_path
    base_meta = base_metadata(base, adapter_config.base_model_revision)
    kind = kind_named(adapter_config.method)
    title = f"{_short(base)} + {kind.label} (merged)" if base else f"{kind.label}-merged sparse model"
    results = dict(eval_results or {})
    card_data = _card_data(
        base_model=base,
        relation="finetune",  # one base, fine-tuned weights: not a "merge" of several models in the Hub's sense
        library_name="transformers",
        license=license or base_meta.get("license"),
        tags=_tags(base_meta.get("method"), report.get("pattern") or base_meta.get("pattern"), extra=[kind.merged_model_kind]),
        datasets=[dataset_name] if _is_dataset_id(dataset_name) else None,
        eval_results=results,
        model_name=repo_id or title,
    )
    settings = _adapter_settings(adapter_config)
    if dataset_name:
        settings.append(("Dataset", f"`{dataset_name}`"))
    return _render(
        "merged", card_data, **_adapter_fields(adapter_config, report, results, repo_id, related),
        title=title, adapter=_link(adapter) if adapter else "not recorded", training_settings=settings,
        description=kind.merged_description.format(base_link=_link(base), sparsity_summary=_summary(report)),
    )  # fmt: skip


def _adapter_fields(
    config: AdapterConfig, report: dict, results: dict, repo_id: str | None, related: list[tuple[str, str]] | None
) -> dict[str, Any]:
    """The template fields adapter and merged-model cards share: the base, its revision and fingerprint, the
    sparsity tables, evaluation rows, related repos and versions."""
    fingerprint = (config.mask_fingerprint or {}).get("hash")
    return dict(
        repo_id=repo_id or PLACEHOLDER_REPO_ID, base_link=_link(config.base_model_name_or_path),
        base_revision=config.base_model_revision or "not recorded",
        fingerprint=fingerprint[:16] if fingerprint else "not recorded", sparsity_summary=_summary(report),
        **_sparsity_rows(report), eval_rows=_eval_rows(results), related=_related(related), versions=_versions(),
    )  # fmt: skip


def render_baseline_merged_card(
    method: str,
    base_model: str | None,
    report: Any,
    *,
    repo_id: str | None = None,
    related: list[tuple[str, str]] | None = None,
    license: str | None = None,  # noqa: A002
) -> str:
    """Card of a merged model trained by a recovery method without an spp-hf adapter to cite.

    `method` is the method's name ("lora_star", "masked_full", an adapter kind's name) or its label ("LoRA*");
    the card describes that method (LoRA*: LoRA merged, then the pruning mask re-applied; masked full
    fine-tuning: masked gradients and updates, nothing re-applied; an adapter kind: its own text). A method
    the cards do not know is only named.
    """
    report = _report_dict(report)
    base_meta = base_metadata(base_model)
    key, label = _method_key(method)
    kind = KINDS.get(key)
    title = f"{_short(base_model)} + {BASELINE_TITLES.get(key, f'{label} (merged)')}"
    description = kind.merged_description if kind else BASELINE_DESCRIPTIONS.get(key, BASELINE_DESCRIPTIONS[""])
    card_data = _card_data(
        base_model=base_model, relation="finetune", library_name="transformers", license=license or base_meta.get("license"),
        tags=_tags(base_meta.get("method"), report.get("pattern") or base_meta.get("pattern"), extra=[key]),
        datasets=None, eval_results={}, model_name=repo_id or title,
    )  # fmt: skip
    return _render(
        "baseline_merged", card_data, title=title, repo_id=repo_id or PLACEHOLDER_REPO_ID, base_link=_link(base_model),
        description=description.format(base_link=_link(base_model), sparsity_summary=_summary(report), method=label),
        sparsity_summary=_summary(report), **_sparsity_rows(report),
        related=_related(related), versions=_versions(),
    )  # fmt: skip


# The recovery baselines that merge without an spp-hf adapter (the pipeline's `lora_star` and `masked_full`), and
# PEFT's methods through `get_sparse_peft_model` (`sparse_peft_method` names them; "masked_lora" is the kind's).
BASELINE_LABELS = {
    "lora_star": "LoRA*", "masked_full": "masked full fine-tuning", "hira": "HiRA", "ia3": "IA³", "masked_lokr": "masked LoKr",
    "masked_loha": "masked LoHa", "masked_vera": "masked VeRA", "masked_fourierft": "masked FourierFT",
}  # fmt: skip
_MASKED_PEFT_DESCRIPTION = (
    "The pruned model {base_link} fine-tuned with PEFT's **{method}**: the update multiplied by the base's zero "
    "mask (`spp_hf.get_sparse_peft_model`), merged as W + ΔW ⊙ (W ≠ 0). It has exactly the base's zeros "
    "({sparsity_summary} in the linear layers) and loads as a plain transformers model."
)
BASELINE_TITLES = {"lora_star": "LoRA* (merged, mask re-applied)", "masked_full": "masked full fine-tuning"}
BASELINE_DESCRIPTIONS = {
    "lora_star": (
        "The pruned model {base_link} fine-tuned with **LoRA**, merged, with the pruning mask re-applied after "
        "merging (the LoRA* baseline of the SPP paper, Table 5): LoRA's update is dense, so the weights the pruning "
        "zeroed were set back to zero. It has exactly the base's zeros ({sparsity_summary} in the linear layers) and "
        "loads as a plain transformers model."
    ),
    "masked_full": (
        "The pruned model {base_link} after **masked full fine-tuning**: every non-zero weight of the targeted "
        "layers was trained, with gradients and optimizer updates masked by the pruning mask, so the pruned weights "
        "stayed zero throughout and nothing was changed after training. It has exactly the base's zeros "
        "({sparsity_summary} in the linear layers) and loads as a plain transformers model."
    ),
    "hira": (
        "The pruned model {base_link} fine-tuned with PEFT's **HiRA** (W ⊙ (1 + B A), a multiplicative update that "
        "keeps every zero by construction) and merged with the merge checked. It has exactly the base's zeros "
        "({sparsity_summary} in the linear layers) and loads as a plain transformers model."
    ),
    "ia3": (
        "The pruned model {base_link} fine-tuned with PEFT's **IA³** (learned per-row or per-column scales, which keep "
        "every zero by construction) and merged with the merge checked. It has exactly the base's zeros "
        "({sparsity_summary} in the linear layers) and loads as a plain transformers model."
    ),
    "masked_lokr": _MASKED_PEFT_DESCRIPTION.replace("{method}", "LoKr"),
    "masked_loha": _MASKED_PEFT_DESCRIPTION,
    "masked_vera": _MASKED_PEFT_DESCRIPTION,
    "masked_fourierft": _MASKED_PEFT_DESCRIPTION,
    "": (
        "The pruned model {base_link} fine-tuned with **{method}** and merged. It has exactly the base's zeros "
        "({sparsity_summary} in the linear layers) and loads as a plain transformers model."
    ),
}


# --------------------------------------------------------------------------- sparse-PEFT adapters
SPARSE_PEFT_LABELS = {
    "LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr", "VERA": "VeRA", "FOURIERFT": "FourierFT", "HIRA": "HiRA", "IA3": "IA³",
}  # fmt: skip


def sparse_peft_label(record: dict) -> str:
    """What a sparse-PEFT adapter is, from spp-hf's record of it: "masked LoRA", "HiRA", ..."""
    peft_type = str(record.get("peft_type"))
    label = SPARSE_PEFT_LABELS.get(peft_type, peft_type)
    return f"masked {label}" if record.get("masked") else label


def sparse_peft_method(record: dict) -> str:
    """The method name of a sparse-PEFT adapter's merged model (its card, its sparsity.json): "hira", "ia3",
    "masked_lokr", ... as `spp-hf run` names them."""
    peft_type = str(record.get("peft_type")).lower()
    return f"masked_{peft_type}" if record.get("masked") else peft_type


def render_sparse_peft_card(
    record: dict,
    peft_config: dict,
    *,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    final_loss: float | None = None,
    training_args: dict | None = None,
    related: list[tuple[str, str]] | None = None,
) -> str:
    """Card of a sparse-PEFT adapter (PEFT's files plus spp-hf's record of its base): how to load it, its base
    (revision, mask fingerprint, sparsity of the adapted layers) and settings. `record` is the
    `spp_sparse_peft.json` data, `peft_config` PEFT's config as saved."""
    base, revision = record.get("base_model_name_or_path"), record.get("base_model_revision")
    base_meta = base_metadata(base, revision)
    fingerprint = record.get("mask_fingerprint") or {}
    report = fingerprint_report(fingerprint)
    label = sparse_peft_label(record)
    settings = [("PEFT method", f"`{record.get('peft_type')}`" + (" (update masked to the base's non-zeros)" if record.get("masked") else ""))]
    settings += [(key, f"`{peft_config[key]}`") for key in ("r", "lora_alpha", "alpha", "target_modules") if peft_config.get(key) is not None]
    if dataset_name:
        settings.append(("Dataset", f"`{dataset_name}`"))
    if final_loss is not None:
        settings.append(("Final training loss", f"{final_loss:.4f}"))
    settings += [(str(k), f"`{v}`") for k, v in sorted((training_args or {}).items()) if v is not None]
    if record.get("masked"):
        plain = (f"`peft.PeftModel.from_pretrained` refuses this folder on purpose (its `peft_type` says how to load it): "
                 f"PEFT alone would apply the {label.removeprefix('masked ')} update unmasked.")  # fmt: skip
    else:
        plain = f"{label} keeps every zero by construction, so `peft.PeftModel.from_pretrained(base, \"{repo_id or PLACEHOLDER_REPO_ID}\")` loads it too."
    title = f"{label} adapter (sparse PEFT) for {_short(base)}" if base else f"{label} adapter (sparse PEFT)"
    card_data = _card_data(
        base_model=base, relation="adapter", library_name="spp-hf", license=base_meta.get("license"),
        tags=_tags(base_meta.get("method"), base_meta.get("pattern"), extra=["peft", "sparse-peft", sparse_peft_method(record)]),
        datasets=[dataset_name] if _is_dataset_id(dataset_name) else None, eval_results={}, model_name=None,
    )  # fmt: skip
    description = (
        f"A PEFT {label} adapter for the pruned model {_link(base)}, trained with `spp_hf.get_sparse_peft_model` so "
        f"that training and merging keep the base's zeros ({len(fingerprint.get('modules', {}))} adapted layers)."
    )
    return _render(
        "sparse_peft_adapter", card_data, title=title, description=description, repo_id=repo_id or PLACEHOLDER_REPO_ID,
        plain_peft=plain, base_link=_link(base), base_revision=revision or "not recorded",
        fingerprint=(fingerprint.get("hash") or "not recorded")[:16], sparsity_summary=_summary(report),
        settings=settings, related=_related(related), versions=[*_versions(), ("peft", importlib.metadata.version("peft"))],
    )  # fmt: skip


def _method_key(method: str) -> tuple[str, str]:
    """(name, label) of a baseline or adapter kind named either way; an unknown method is both."""
    labels = {**BASELINE_LABELS, **{name: kind.label for name, kind in KINDS.items()}}
    if method in labels:
        return method, labels[method]
    return next(((name, label) for name, label in labels.items() if label == method), (method, method))


def template_path(kind: str) -> Path:
    """The Jinja template of one card kind ("pruned_base", "adapter", "merged", "baseline_merged")."""
    packaged = importlib.resources.files("spp_hf.hub") / "card_templates" / f"{kind}.md"
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(f"No model-card template {kind}.md in spp_hf/hub/card_templates/: reinstall spp-hf.")


def fill_repo_id(text: str, repo_id: str) -> str:
    """Put the repo id a card is pushed to where the card still has the placeholder."""
    return text.replace(PLACEHOLDER_REPO_ID, repo_id)


# --------------------------------------------------------------------------- base metadata
def base_metadata(name_or_path: str | None, revision: str | None = None) -> dict[str, Any]:
    """License, tags, pruning method and N:M pattern of a base, read from its README.md / sparsity.json.

    Looks in a local folder, else on the Hub (through the cache; nothing in offline mode). Best
    effort: a base whose files cannot be read gives {} and the card simply omits those fields.
    """
    if not name_or_path:
        return {}
    return dict(_base_metadata_cached(constants.ENDPOINT, str(name_or_path), revision))


def clear_base_metadata_cache() -> None:
    _base_metadata_cached.cache_clear()


@functools.lru_cache(maxsize=32)
def _base_metadata_cached(endpoint: str, name_or_path: str, revision: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    readme = _base_file(name_or_path, "README.md", revision)
    if readme is not None:
        try:
            data = ModelCard.load(readme, ignore_metadata_errors=True).data
            meta.update({k: v for k, v in (("license", data.license), ("tags", data.tags)) if v})
        except (ValueError, OSError):
            pass
    sparsity = _base_file(name_or_path, "sparsity.json", revision)
    if sparsity is not None:
        try:
            data = json.loads(sparsity.read_text())
            meta.update({k: data[k] for k in ("method", "pattern") if isinstance(data.get(k), str)})
        except (ValueError, OSError):
            pass
    if "method" not in meta:
        methods = [t for t in meta.get("tags") or [] if t in PRUNING_METHODS]
        if methods:
            meta["method"] = methods[0]
    return meta


def _base_file(name_or_path: str, filename: str, revision: str | None) -> Path | None:
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    if not is_hub_id(name_or_path):
        return None
    cached = try_to_load_from_cache(name_or_path, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if constants.is_offline_mode():
        return None
    try:
        # One quick HEAD without retries first: hf_hub_download retries for ~20 s when the Hub is unreachable.
        get_hf_file_metadata(hf_hub_url(name_or_path, filename, revision=revision), timeout=5)
        return Path(hf_hub_download(name_or_path, filename, revision=revision))
    except Exception:  # noqa: BLE001 - best effort: any failure only means the card omits these fields
        return None


# --------------------------------------------------------------------------- helpers
def _is_dataset_id(name: str | None) -> bool:
    """A Hub dataset id, not a local data file or the name of a sample bundled with spp-hf."""
    data_file = bool(name) and str(name).endswith((".json", ".jsonl", ".txt", ".csv", ".parquet"))
    return is_hub_id(name) and name not in BUNDLED and not data_file


def _link(name: str | None) -> str:
    if not name:
        return "an unrecorded base model"
    if is_hub_id(name):
        return f"[`{name}`]({constants.ENDPOINT}/{name})"
    return f"`{name}` (a local folder)"


def _related(related: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """(label, markdown link) rows for the cards' "Related repos" section."""
    return [(label, _link(name)) for label, name in related or []]


def _short(name: str | None) -> str:
    return str(name).rstrip("/").split("/")[-1] if name else "model"


def _card_data(*, base_model, relation, library_name, license, tags, datasets, eval_results, model_name) -> ModelCardData:  # noqa: A002
    hub_base = base_model if is_hub_id(base_model) else None
    entries = [
        EvalResult(task_type="text-generation", dataset_type=d, dataset_name=d, metric_type=m, metric_value=v)
        for d, m, v in _eval_entries(eval_results)
    ]
    extra = {"base_model_relation": relation} if hub_base else {}
    return ModelCardData(
        base_model=hub_base,
        library_name=library_name,
        license=license,
        tags=tags,
        datasets=datasets,
        pipeline_tag="text-generation",
        eval_results=entries or None,
        model_name=model_name if entries else None,
        **extra,
    )


def _tags(method: str | None, pattern: str | None, extra: Iterable[str] = ()) -> list[str]:
    tags = ["spp", "sparse", "pruned"]
    if method:
        tags.append(str(method).lower())
    tags.append(pattern if pattern else "unstructured")
    return tags + [t for t in extra if t not in tags]


def _render(kind: str, card_data: ModelCardData, **kwargs: Any) -> str:
    return str(ModelCard.from_template(card_data, template_path=str(template_path(kind)), **kwargs))


def _perplexity_cell(perplexity: float | None, dataset: str | None) -> str:
    if perplexity is None:
        return "not measured"
    return f"{perplexity:.3f}" + (f" ({dataset})" if dataset else "")


def _report_dict(report: Any) -> dict:
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
        raise TypeError("report must be SparsityReport.to_dict() (a dict with a 'layers' list)")
    return report


def _model_report(model: Any, names: Iterable[str] | None = None) -> dict:
    """Sparsity report measured on the model's weights, restricted to `names` (the adapter's layers) if given."""
    report = sparsity_report(model)
    if names is not None:
        keep = set(names)
        report = SparsityReport([layer for layer in report.layers if layer.name in keep])
    return report.to_dict()


def fingerprint_report(fingerprint: dict | None) -> dict:
    """Per-layer zeros and ratio from the fingerprint an adapter records (no N:M pattern: it stores only hashes)."""
    layers = []
    for name, module in (fingerprint or {}).get("modules", {}).items():
        numel = int(module["shape"][0]) * int(module["shape"][1])
        layers.append({"name": name, "shape": module["shape"], "zeros": module["zeros"], "numel": numel,
                       "ratio": module["zeros"] / numel if numel else 0.0, "pattern": None})  # fmt: skip
    zeros, numel = sum(layer["zeros"] for layer in layers), sum(layer["numel"] for layer in layers)
    return {"ratio": zeros / numel if numel else 0.0, "zeros": zeros, "numel": numel, "pattern": None, "layers": layers}


def _summary(report: dict) -> str:
    if not report.get("layers"):
        return "sparsity not recorded"
    pattern = f", {report['pattern']} pattern" if report.get("pattern") else ""
    return f"{100 * report['ratio']:.2f}% zeros{pattern}"


def _sparsity_rows(report: dict) -> dict[str, list[dict[str, Any]]]:
    by_type: dict[str, dict[str, Any]] = {}
    layers = []
    for layer in report.get("layers", []):
        kind = layer["name"].rsplit(".", 1)[-1]
        row = by_type.setdefault(kind, {"name": kind, "count": 0, "zeros": 0, "numel": 0, "patterns": set()})
        row["count"] += 1
        row["zeros"] += layer["zeros"]
        row["numel"] += layer["numel"]
        row["patterns"].add(layer.get("pattern"))
        layers.append({"name": layer["name"], "shape": "×".join(map(str, layer["shape"])), "zeros": f"{layer['zeros']:,}",
                       "ratio": f"{layer['ratio']:.4f}", "pattern": layer.get("pattern") or "-"})  # fmt: skip
    summary = []
    for row in by_type.values():
        patterns = row.pop("patterns")
        ratio = f"{row['zeros'] / row['numel']:.4f}" if row["numel"] else "-"
        pattern = (patterns.pop() or "-") if len(patterns) == 1 else "mixed"
        summary.append({**row, "zeros": f"{row['zeros']:,}", "ratio": ratio, "pattern": pattern})
    return {"sparsity_by_type": summary, "sparsity_layers": layers}


def _adapter_settings(config: AdapterConfig) -> list[tuple[str, str]]:
    return kind_named(config.method).card_settings(config)


def _adapter_params(config: AdapterConfig) -> int:
    """Trainable parameters over the layers in the adapter's fingerprint, as its kind counts them."""
    count = kind_named(config.method).parameter_count
    return sum(count(config, *module["shape"]) for module in (config.mask_fingerprint or {}).get("modules", {}).values())


def _eval_entries(eval_results: dict | None) -> list[tuple[str, str, float]]:
    """(data, metric, value) from `{data: {metric: value}}` (lm-eval's `results` works as is) or `{metric: value}`.

    lm-eval's filter suffixes (`acc,none`) are dropped, `*_stderr` and non-numeric values skipped.
    """
    entries = []
    for name, value in (eval_results or {}).items():
        if isinstance(value, dict):
            for metric, number in value.items():
                metric = str(metric).split(",")[0]
                if _is_number(number) and not metric.endswith("_stderr"):
                    entries.append((str(name), metric, float(number)))
        elif _is_number(value):
            entries.append(("evaluation", str(name), float(value)))
    return entries


def _eval_rows(eval_results: dict | None) -> list[dict[str, str]]:
    return [{"dataset": d, "metric": m, "value": f"{v:.4g}"} for d, m, v in _eval_entries(eval_results)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _versions() -> list[tuple[str, str]]:
    return [("spp-hf", __version__), ("transformers", transformers.__version__), ("torch", torch.__version__),
            ("huggingface_hub", huggingface_hub.__version__)]  # fmt: skip
