"""The settings of `spp-hf run`: one dataclass per section, loaded from YAML, every field overridable with
`--set section.key=value`. Checked here: unknown names, numbers YAML reads as strings, and held-out texts
that a stage would also train or calibrate on."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters.config import DEFAULT_TARGETS
from .layout import RunLayout


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
    # change s·α·β grows roughly as s·(lr·t)², so a 30-step run needs a larger lr (the sweep that chose it:
    # docs/results.md, "The default run").
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
    # > 0: add this × SquareHead's feature loss (normalised MSE to the dense model's hidden states at every
    # decoder layer's output); needs the dense teacher too, loaded whenever either weight is > 0.
    distill_feature_weight: float = 0.0


@dataclass
class LoraSettings:
    r: int = 8
    lora_alpha: int = 16
    learning_rate: float = 3e-3  # the better of 1e-3 and 3e-3 on the default run (docs/results.md)


@dataclass
class MaskedFullSettings:
    learning_rate: float = 5e-5  # a common full fine-tuning lr for a model this size; tune on wiki-validation


@dataclass
class PeftSettings:
    """PEFT's own adapters on the pruned base with its zeros kept (`spp_hf.get_sparse_peft_model`): HiRA and IA³
    keep zeros by construction, LoKr through the masked update. The rates are the ones the Wikipedia validation
    split picked at Wanda 2:4, each bracketed by a 60-step sweep (docs/results.md); at another sparsity or
    model, tune them on wiki-validation."""

    r: int = 8  # HiRA's and LoKr's rank (IA³ has none)
    lokr_alpha: int = 16
    hira_learning_rate: float = 2e-2
    ia3_learning_rate: float = 1e-2
    lokr_learning_rate: float = 1e-2


@dataclass
class EvalSettings:
    ppl_seqlen: int = 1024
    ppl_windows: int | None = 8  # WikiText-2 test windows (None: all; 0: none, for tuning runs that must not see the test set)
    # Perplexity on texts that no stage trains or calibrates on (bundled corpora; 'none' for none).
    heldout: str = "wiki-validation,c4-heldout"
    heldout_windows: int | None = 4  # the default run is a quick demo; the recovery configs use more
    tasks: str = "spp_arc_easy,spp_copa"
    limit: int | None = 20  # questions per task (None: all the bundled task has, 200 or 100 for COPA)
    batch_size: int = 8

    @property
    def heldout_names(self) -> list[str]:
        """The held-out corpora `heldout` names, in order."""
        return [n for n in self.heldout.replace(",", " ").split() if n != "none"]


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
    peft: PeftSettings = field(default_factory=PeftSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def layout(self) -> RunLayout:
        """Where this run's stages write (`spp_hf.pipeline.layout`)."""
        return RunLayout(self.run_dir)

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
    return yaml.load(text, Loader=_config_loader())


@functools.cache
def _config_loader() -> type:
    """A SafeLoader whose int/float constructors leave colon-separated scalars as strings (built once)."""

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


def with_overrides(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """A copy of `cfg` with `section.key=value` overrides applied (checked like the YAML file's)."""
    return PipelineConfig.from_dict(apply_overrides(dataclasses.asdict(cfg), overrides))


def check_data_separation(cfg: PipelineConfig) -> None:
    """Held-out evaluation texts must be neither trained on nor used for calibration."""
    heldout = set(cfg.eval.heldout_names)
    used = {"train.data": cfg.train.data, "prune.calibration": cfg.prune.calibration}
    clash = {k: v for k, v in used.items() if v in heldout}
    if clash:
        raise ValueError(
            f"{clash} is also evaluated as held-out text (eval.heldout={cfg.eval.heldout!r}): train and calibrate on "
            "'wiki-pretrain' / 'c4-sample' (or your own files), or drop it from eval.heldout."
        )
