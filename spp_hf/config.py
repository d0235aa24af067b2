"""`SPPConfig`: the settings of one SPP adapter, saved as `spp_config.json` next to its weights."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .files import atomic_write_text

CONFIG_NAME = "spp_config.json"
WEIGHTS_NAME = "spp_adapter.safetensors"
FORMAT_VERSION = 1
IMPLS = ("auto", "naive", "blocked", "fused")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")

# field -> (accepted types, what to write): bool is refused where a number is meant (JSON true is not 1)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "r": ((int,), "a positive integer"),
    "scale": ((int, float), "a number"),
    "dropout": ((int, float), "a number in [0, 1)"),
    "target_modules": ((list, str), "a list of module-name suffixes, a regex string or 'all-linear'"),
    "impl": ((str,), f"one of {IMPLS}"),
    "use_beta": ((bool,), "true or false"),
    "zero_init": ((str,), "'beta' or 'alpha'"),
    "adapter_dtype": ((str,), "a dtype name such as 'float32'"),
    "base_model_name_or_path": ((str, type(None)), "a path or repo id, or null"),
    "base_model_revision": ((str, type(None)), "a commit hash or revision name, or null"),
    "mask_fingerprint": ((dict, type(None)), "a fingerprint object, or null"),
    "spp_hf_version": ((str, type(None)), "a version string, or null"),
    "format_version": ((int,), "an integer"),
}


def _check_types(config: "SPPConfig") -> None:
    for name, (types, wanted) in _FIELD_TYPES.items():
        value = getattr(config, name)
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if name == "target_modules" and isinstance(value, list):
            wrong = not all(isinstance(t, str) for t in value)
        if wrong:
            raise ValueError(f"SPPConfig.{name} must be {wanted}, got {value!r} ({type(value).__name__})")


def _version() -> str:
    from . import __version__

    return __version__


@dataclass
class SPPConfig:
    """Settings of an SPP adapter (paper Sec. 3.2, Eq. 4-5).

    Args:
        r: rows of α (r × in_features); each α row scales out_features / r consecutive output rows.
        scale: s in Eq. 5. 2.0 matches the official recipe (lora_alpha / lora_r).
        dropout: dropout on the input of the SPP branch.
        target_modules: module-name suffixes, a regex string, or "all-linear" (every linear layer
            except the output embedding).
        impl: "naive" (materialise W'), "blocked" (Eq. 7), "fused" (one GEMM on W_eff) or "auto".
        use_beta: ablation of Table 4; False freezes β at 1 (α is then zero-initialised).
        zero_init: which factor starts at zero so the model starts as the pruned base:
            "beta" (paper default, α kaiming-uniform) or "alpha" (Table 8 ablation).
        adapter_dtype: dtype of α and β, independent of the base dtype.
    """

    r: int = 16
    scale: float = 2.0
    dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    impl: Literal["auto", "naive", "blocked", "fused"] = "auto"
    use_beta: bool = True
    zero_init: Literal["beta", "alpha"] = "beta"
    adapter_dtype: str = "float32"
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    mask_fingerprint: dict | None = None
    spp_hf_version: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        _check_types(self)
        if not self.r >= 1:
            raise ValueError(f"SPPConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SPPConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"SPPConfig.scale must be a finite number, got {self.scale!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"SPPConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if self.zero_init not in ("beta", "alpha"):
            raise ValueError(f"SPPConfig.zero_init must be 'beta' or 'alpha', got {self.zero_init!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"SPPConfig.adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.mask_fingerprint is not None and not isinstance(self.mask_fingerprint.get("modules"), dict):
            raise ValueError("SPPConfig.mask_fingerprint must be None or a fingerprint with a 'modules' mapping")
        if not self.use_beta and self.zero_init != "alpha":
            # Without a trainable β, α must start at zero for the model to start as the pruned base.
            self.zero_init = "alpha"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SPPConfig":
        """Build a config from JSON data, refusing files from a newer, incompatible spp-hf."""
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ValueError(
                f"This adapter was saved by spp-hf {data.get('spp_hf_version', '?')} with format version "
                f"{version}; this spp-hf ({_version()}) reads up to format {FORMAT_VERSION}. "
                "Upgrade with `pip install -U spp-hf`."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `spp_config.json` atomically and return its path."""
        self.spp_hf_version = _version()
        path = Path(save_directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SPPConfig":
        """Read `spp_config.json`; every problem is reported with the file, the field and the fix."""
        path = Path(path)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"No {CONFIG_NAME} at {path.parent}: this is not an SPP adapter (a LoRA/PEFT adapter has "
                "adapter_config.json instead). Point to a directory or repo saved by spp-hf."
            ) from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err}); the adapter is corrupt, save or download it again.") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); the adapter is corrupt, save or download it again.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a JSON object; the adapter is corrupt.")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            if "pip install -U spp-hf" in str(err):
                raise
            raise ValueError(
                f"{path} has an invalid field: {err}. Fix that field in the file, or save or download the adapter again."
            ) from None
