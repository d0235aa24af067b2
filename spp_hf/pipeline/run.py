"""`spp-hf run`: prune → train every recovery method → merge → evaluate → report.

Every method (`spp_hf.pipeline.methods`: SPP, LoRA*, masked full fine-tuning, ...) trains on the same pruned
base with the same data, steps and evaluation, at one or more seeds. Every stage writes a folder a
user could publish, and is skipped when its output already exists, so an interrupted run resumes where
it stopped (training resumes from its last checkpoint):

    runs/<name>/pruned/                  the pruned base (checkpoint + sparsity.json + card)
    runs/<name>/data/                    the calibration documents the pruning used
    runs/<name>/<method>_s<seed>/train/  checkpoints, loss_history.json, metrics.json
    runs/<name>/<method>_s<seed>/adapter/  the adapter (adapter methods: SPP)
    runs/<name>/<method>_s<seed>/merged/   the merged model, with the pruned base's exact zeros
    runs/<name>/eval/<variant>.json      WikiText-2 and held-out perplexities, zero-shot accuracy
    runs/<name>/report.md (+ PNG plots)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.config import DEFAULT_TARGETS
from ..storage import atomic_write_text, check_model_folder_target
from .methods import Prepared, get_method, linear_zeros, load_plain

logger = logging.getLogger(__name__)

BASELINES = ("dense", "pruned")


@dataclass
class PruneSettings:
    method: str = "wanda"
    sparsity: str = "2:4"
    # A bundled corpus name (`spp_hf.data.corpora`; 'c4-sample' is the calibration half of the bundled C4
    # sample, disjoint from the held-out 'c4-heldout'), a local text/jsonl file or a Hub dataset id.
    calibration: str = "c4-sample"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0


@dataclass
class TrainSettings:
    # 'bundled' (500 Alpaca examples), a bundled corpus ('wiki-pretrain', 'c4-sample': plain text, packed),
    # a local json/jsonl(.gz) or a Hub id: rows with instruction/output get the Alpaca prompt, rows with only
    # 'text' are packed as they are.
    data: str = "bundled"
    max_samples: int | None = None
    max_steps: int = 30
    # The most passes over the training rows a run may make: a run whose steps need more raises before
    # training (recovery must not fit repeated text); raise it to allow repeats on purpose.
    max_epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    # SPP's lr. Higher than the paper's 4e-3 (a 3-epoch recipe): with β = 0 at the start and Adam, the weight
    # change s·α·β grows roughly as s·(lr·t)², so a 30-step run needs a larger lr. Sweep on the default run
    # (WikiText-2 gap closed): 1e-2 35.4%, 2e-2 44.6%, 3e-2 46.0%.
    learning_rate: float = 3e-2
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    r: int = 16
    scale: float = 2.0
    dropout: float = 0.0  # SPP's and LoRA's dropout
    impl: str = "auto"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = 0  # replaced by each variant's seed (see PipelineConfig.seeds)
    save_steps: int = 20
    gradient_checkpointing: bool = False  # TRL's default is True; a 135M model at 4 × 256 tokens does not need it
    # 0: the paper's language-modelling loss. > 0: distil from the dense model (`spp_hf.training.distillation`), the
    # same way for every method: loss = (1 - w)·CE + w·KL(dense ‖ student).
    distill_weight: float = 0.0


@dataclass
class LoraSettings:
    r: int = 8
    lora_alpha: int = 16
    learning_rate: float = 3e-3  # the better of 1e-3 (39.2% gap closed) and 3e-3 (44.8%) on the default run


@dataclass
class MaskedFullSettings:
    learning_rate: float = 5e-5  # a common full fine-tuning lr for a model this size; tune on wiki-validation


@dataclass
class EvalSettings:
    ppl_seqlen: int = 1024
    ppl_windows: int | None = 8  # WikiText-2 test windows (None: all; 0: none, for tuning runs that must not see the test set)
    # Perplexity on texts that no stage trains or calibrates on (bundled corpora; 'none' for none).
    heldout: str = "wiki-validation,c4-heldout"
    heldout_windows: int | None = 4  # the default run is a quick demo; the recovery configs use 16
    tasks: str = "spp_arc_easy,spp_copa"
    limit: int | None = 20  # questions per task (None: all the bundled task has, 200 or 100 for COPA)
    batch_size: int = 8


@dataclass
class PipelineConfig:
    """The whole run; loaded from YAML with nested sections, every field overridable with --set a.b=v."""

    name: str = "default"
    model: str = "smollm2"  # a path, a Hub id, or 'smollm2' (the offline SmolLM2-135M)
    output_dir: str = "runs"
    # Recovery methods to compare (names in spp_hf.pipeline.methods.METHODS, or of `variants` below).
    methods: list[str] = field(default_factory=lambda: ["spp", "lora_star"])
    seeds: list[int] = field(default_factory=lambda: [0])  # every method trains once per seed
    method_seeds: dict[str, list[int]] = field(default_factory=dict)  # per-method seeds, e.g. {masked_full: [0]}
    # Named variants of a method with other settings, e.g. {spp_dropout05: {method: spp, set: [train.dropout=0.05]}}
    variants: dict[str, dict] = field(default_factory=dict)
    prune: PruneSettings = field(default_factory=PruneSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    masked_full: MaskedFullSettings = field(default_factory=MaskedFullSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "PipelineConfig":
        data = load_yaml(Path(path).read_text()) or {}
        return cls.from_dict(apply_overrides(data, overrides or []))


def _build(cls: type, data: dict, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"Unknown pipeline setting(s) {[where + u for u in unknown]}; known: {[where + f for f in fields]}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, fields[name].default, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    """YAML reads `2e-2` as a string and `1` as an int: convert to a float field's type, or say why not."""
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"Pipeline setting {where} must be a number, got {value!r}") from None
    return value


def load_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, except that `2:4` stays the string "2:4".

    YAML 1.1 reads digits separated by colons as base-60 numbers (`2:4` → 124), which would turn an
    N:M sparsity into a ratio.
    """
    import yaml

    return yaml.load(text, Loader=_config_loader())


@functools.cache
def _config_loader() -> type:
    """A SafeLoader whose int/float constructors leave colon-separated scalars as strings (built once)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def number_or_ratio(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        text = loader.construct_scalar(node)
        return text if ":" in text else yaml.SafeLoader.yaml_constructors[node.tag](loader, node)

    for tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
        Loader.add_constructor(tag, number_or_ratio)
    return Loader


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value (e.g. train.max_steps=10), got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = load_yaml(raw)
    return data


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One training run of the comparison: a registered method at one seed, with its settings."""

    name: str  # folder and evaluation name: <entry>_s<seed>
    entry: str  # the `methods:` entry (a method or a variant name)
    method: str  # the registered method
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        base = get_method(self.method).label if self.entry == self.method else self.entry
        return f"{base} s{self.seed}"


def variants(cfg: PipelineConfig) -> list[Variant]:
    """Every (method, seed) run the config asks for, checked before anything runs."""
    entries = [cfg.methods] if isinstance(cfg.methods, str) else list(cfg.methods)
    from .methods import METHODS

    unknown_seeds = sorted(set(cfg.method_seeds) - set(entries) - set(METHODS) - set(cfg.variants))
    if unknown_seeds:
        raise ValueError(f"method_seeds names {unknown_seeds}, neither a method {sorted(METHODS)} nor a variant {sorted(cfg.variants)}.")
    found = []
    for entry in entries:
        spec = cfg.variants.get(entry, {"method": entry})
        extra = sorted(set(spec) - {"method", "set"})
        if extra or "method" not in spec:
            raise ValueError(f"variants.{entry} needs 'method' (and optionally 'set': [key=value, ...]); got keys {sorted(spec)}.")
        get_method(spec["method"])
        overrides = tuple([spec["set"]] if isinstance(spec.get("set"), str) else spec.get("set", []))
        _variant_config(cfg, overrides, 0)  # unknown settings fail now, not after pruning
        for seed in cfg.method_seeds.get(entry, cfg.seeds):
            found.append(Variant(f"{entry}_s{seed}", entry, spec["method"], int(seed), overrides))
    names = [v.name for v in found]
    if len(set(names)) != len(names) or set(names) & set(BASELINES):
        raise ValueError(f"Variant names must be unique and not {BASELINES}; got {names}.")
    return found


def _variant_config(cfg: PipelineConfig, overrides: tuple[str, ...], seed: int) -> PipelineConfig:
    data = apply_overrides(dataclasses.asdict(cfg), [*overrides, f"train.seed={seed}"])
    return PipelineConfig.from_dict(data)


def check_data_separation(cfg: PipelineConfig) -> None:
    """Held-out evaluation texts must be neither trained on nor used for calibration."""
    heldout = set(_heldout_names(cfg))
    used = {"train.data": cfg.train.data, "prune.calibration": cfg.prune.calibration}
    clash = {k: v for k, v in used.items() if v in heldout}
    if clash:
        raise ValueError(
            f"{clash} is also evaluated as held-out text (eval.heldout={cfg.eval.heldout!r}): train and calibrate on "
            "'wiki-pretrain' / 'c4-sample' (or your own files), or drop it from eval.heldout."
        )


def _heldout_names(cfg: PipelineConfig) -> list[str]:
    return [n for n in cfg.eval.heldout.replace(",", " ").split() if n != "none"]


# --------------------------------------------------------------------------- helpers
def _resolve_model(name: str) -> str:
    if name == "smollm2":
        from ..data.default_model import smollm2_path

        return str(smollm2_path())
    return name


def _done(path: Path, what: str) -> bool:
    if path.exists():
        logger.warning("[skip] %s: found %s", what, path)
        return True
    logger.warning("[run] %s", what)
    return False


def _training_args(cfg: PipelineConfig, output_dir: Path, learning_rate: float, packing: bool):
    from ..training.trainer import SPPSFTConfig

    t = cfg.train
    return SPPSFTConfig(
        packing=packing,
        packing_strategy="wrapped",  # plain text: fill every sequence (documents cut at max_length otherwise)
        gradient_checkpointing=t.gradient_checkpointing,
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=learning_rate,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        max_length=t.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=1,
        report_to="none",
        seed=t.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def _train_data(cfg: PipelineConfig):
    """(rows, packed): Alpaca examples one per sequence, plain text packed into full sequences."""
    from ..data.training_data import load_sft_data

    return load_sft_data(cfg.train.data, max_samples=cfg.train.max_samples)


def check_one_epoch(trainer, cfg: PipelineConfig) -> float:
    """The passes over the (packed) training rows the steps make; raises before training when more than train.max_epochs."""
    t = cfg.train
    rows = len(trainer.train_dataset)
    needed = t.max_steps * t.batch_size * t.grad_accum * max(1, trainer.args.world_size)
    if needed > t.max_epochs * rows:
        most = int(t.max_epochs * rows) // (t.batch_size * t.grad_accum * max(1, trainer.args.world_size))
        raise ValueError(
            f"train.max_steps={t.max_steps} needs {needed} sequences but {t.data!r} gives {rows} "
            f"({needed / rows:.2f} epochs > train.max_epochs={t.max_epochs}): lower train.max_steps to at most {most}, "
            "train on more text, or raise train.max_epochs to repeat it on purpose."
        )
    return needed / rows


def _distillation(cfg: PipelineConfig) -> dict[str, Any]:
    """Trainer arguments that make the dense model the teacher, or none for the plain LM loss."""
    if cfg.train.distill_weight <= 0:
        return {}
    teacher, _ = load_plain(_resolve_model(cfg.model))
    return {"teacher_model": teacher, "distill_weight": cfg.train.distill_weight}


def _checkpoint_step(output_dir: Path) -> int:
    """The step of the last checkpoint in `output_dir` (0: none, training starts afresh)."""
    steps = [int(p.name.removeprefix("checkpoint-")) for p in output_dir.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    return max(steps, default=0)


def _save_loss_history(trainer, train_dir: Path) -> None:
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    atomic_write_text(train_dir / "loss_history.json", json.dumps(losses))


# --------------------------------------------------------------------------- stages
def stage_prune(cfg: PipelineConfig) -> Path:
    from ..pruning import prune, save_pruned

    out = cfg.run_dir / "pruned"
    if _done(out / "sparsity.json", f"prune {cfg.model} with {cfg.prune.method} {cfg.prune.sparsity}"):
        return out
    check_model_folder_target(out, "pruned-base")  # before any loading or pruning
    model, tokenizer = load_plain(_resolve_model(cfg.model))
    p = cfg.prune
    report = prune(
        model, method=p.method, sparsity=p.sparsity, calibration=_calibration_file(cfg),
        tokenizer=tokenizer, nsamples=p.nsamples, seqlen=p.seqlen, seed=p.seed,
    )  # fmt: skip
    save_pruned(model, tokenizer, out, report)
    return out


def _calibration_file(cfg: PipelineConfig) -> str:
    """A bundled corpus is written to runs/<name>/data/<corpus>.jsonl (the record of what calibrated); others pass through."""
    from ..data.corpora import CORPORA, documents

    name = cfg.prune.calibration
    if name not in CORPORA:
        return name
    path = cfg.run_dir / "data" / f"{name}.jsonl"
    atomic_write_text(path, "".join(json.dumps({"text": text}) + "\n" for text in documents(name)))
    return str(path)


def stage_method(cfg: PipelineConfig, pruned: Path, variant: Variant) -> Path:
    """Train one variant on the pruned base, merge it, check its zeros bit for bit, save it."""
    vcfg = _variant_config(cfg, variant.overrides, variant.seed)
    method = get_method(variant.method)
    out = cfg.run_dir / variant.name
    merged, train_dir = out / "merged", out / "train"
    if _done(merged / "config.json", f"{variant.name}: {method.label}, seed {variant.seed} ({vcfg.train.max_steps} steps)"):
        return merged
    check_model_folder_target(merged, "merged")  # before any training
    base, tokenizer = load_plain(pruned)
    zeros = linear_zeros(base)
    reference = linear_fingerprint(base)  # every linear layer's mask, the bit-for-bit reference of the merged model
    del base
    gc.collect()
    from ..training.peak_memory import peak_memory, reset_peak_memory

    reset_peak_memory()
    data, packed = _train_data(vcfg)
    lr = method.learning_rate(vcfg)
    prepared = method.prepare(vcfg, pruned, data, _training_args(vcfg, train_dir, lr, packed), _distillation(vcfg), zeros)
    trainer = prepared.trainer
    epochs = check_one_epoch(trainer, vcfg)
    resumed_from = _checkpoint_step(train_dir)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resumed_from > 0 or None)
    seconds = time.perf_counter() - start
    memory = peak_memory()
    _save_loss_history(trainer, train_dir)
    metrics = {
        "variant": variant.name, "method": variant.method, "entry": variant.entry, "seed": variant.seed,
        "label": variant.label, "overrides": list(variant.overrides), "learning_rate": lr,
        "trainable_parameters": prepared.trainable_parameters, "train_seconds": seconds, "epochs": epochs,
        "steps": trainer.state.global_step, "resumed_from_step": resumed_from,  # seconds cover the steps after it
        "peak_memory_bytes": memory["bytes"], "peak_memory_kind": memory["kind"],
    }  # fmt: skip
    atomic_write_text(train_dir / "metrics.json", json.dumps(metrics, indent=2))
    save_merged(prepared.merge(), tokenizer, merged, prepared, reference, variant, vcfg.train.data)
    return merged


def linear_fingerprint(model) -> dict:
    """The mask fingerprint of every linear layer of `model` (the output embedding excluded)."""
    from ..sparsity import fingerprint_modules, iter_linear_weights

    with torch.no_grad():
        return fingerprint_modules(iter_linear_weights(model))


def save_merged(model, tokenizer, out: Path, prepared: Prepared, reference: dict, variant: Variant, data: str) -> None:
    """Write the merged model folder (checkpoint, sparsity.json, card), refused unless its zeros are the base's, bit for bit."""
    from ..storage import model_sparsity_record, write_model_folder

    try:
        record = model_sparsity_record(
            model, prepared.kind, base_mask_fingerprint=reference, method=variant.method, seed=variant.seed, training_data=data
        )
    except ValueError as err:
        raise RuntimeError(f"{variant.name}: {err} This is a bug in the method's merge: please report it.") from None
    write_model_folder(model, tokenizer, out, prepared.card(model), record)


def stage_eval(cfg: PipelineConfig, paths: dict[str, Path]) -> dict[str, dict]:
    from .evaluation import corpus_perplexity, perplexity_result, zero_shot

    results = {}
    for variant, path in paths.items():
        out = cfg.run_dir / "eval" / f"{variant}.json"
        if not _done(out, f"evaluate {variant}"):
            model, tokenizer = load_plain(path)
            record: dict[str, Any] = {"variant": variant, "path": str(path), "ppl_seqlen": cfg.eval.ppl_seqlen, "heldout": {}}
            if cfg.eval.ppl_windows != 0:
                ppl = perplexity_result(model, tokenizer, seqlen=cfg.eval.ppl_seqlen, max_windows=cfg.eval.ppl_windows)
                record.update(ppl=ppl.ppl, nll=ppl.nll, ppl_windows=ppl.windows)
            for name in _heldout_names(cfg):
                found = corpus_perplexity(model, tokenizer, name, seqlen=cfg.eval.ppl_seqlen, max_windows=cfg.eval.heldout_windows)
                record["heldout"][name] = {"ppl": found.ppl, "nll": found.nll, "windows": found.windows, "seqlen": found.seqlen}
            if cfg.eval.tasks and cfg.eval.tasks != "none":
                record["zero_shot"] = zero_shot(model, tokenizer, tasks=cfg.eval.tasks, limit=cfg.eval.limit, batch_size=cfg.eval.batch_size)
            atomic_write_text(out, json.dumps(record, indent=2))
            del model
            gc.collect()
        results[variant] = json.loads(out.read_text())
    return results


def gap_closed(ppl_pruned: float, ppl_recovered: float, ppl_dense: float) -> float:
    """Share of the log-perplexity gap between pruned and dense that a recovery method closes."""
    return (math.log(ppl_pruned) - math.log(ppl_recovered)) / (math.log(ppl_pruned) - math.log(ppl_dense))


def run_pipeline(cfg: PipelineConfig, skip: set[str] | None = None) -> Path:
    """Run every stage not skipped (`skip` may name 'eval', methods, `methods:` entries or variants); returns report.md."""
    skip = skip or set()
    runs = [v for v in variants(cfg) if not {v.name, v.entry, v.method} & skip]
    check_data_separation(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    start = time.perf_counter()
    pruned = stage_prune(cfg)
    paths = {"dense": Path(_resolve_model(cfg.model)), "pruned": pruned}
    for variant in runs:
        paths[variant.name] = stage_method(cfg, pruned, variant)
        gc.collect()
    results = stage_eval(cfg, paths) if "eval" not in skip else {}
    from .report import write_report

    report = write_report(cfg, runs, results, time.perf_counter() - start)
    logger.warning("report: %s", report)
    return report


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("run", help="prune → train each recovery method → merge → evaluate → report (default: SmolLM2-135M)")
    parser.add_argument("config", nargs="?", help="YAML pipeline config (default: the embedded SmolLM2 default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.max_steps=10")
    parser.add_argument("--skip", default="", help="comma-separated methods, variants or 'eval' to skip, e.g. lora_star,eval")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if args.config:
        cfg = PipelineConfig.from_yaml(args.config, args.set)
    else:
        cfg = PipelineConfig.from_dict(apply_overrides({}, args.set))
    report = run_pipeline(cfg, {s for s in args.skip.split(",") if s})
    print(report.read_text())
    return 0
