"""Adapter configs: `SPPConfig` and `MaskedLoRAConfig`, saved as `spp_config.json` next to their weights.

Both share `AdapterConfig`'s fields (what the adapter targets and which pruned base it belongs to) and its
file handling. The file records the adapter's `method` ("spp", the default for files written before the
field existed, or "masked_lora"); `AdapterConfig.from_dict` builds the matching class, and each class
refuses a file of the other method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from ..storage import CONFIG_NAME, WEIGHTS_NAME, write_json

FORMAT_VERSION = 1
IMPLS = ("auto", "naive", "blocked", "fused")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")
DEFAULT_METHOD = "spp"  # what a config file without a "method" field holds

# field -> (accepted types, what to write): bool is refused where a number is meant (JSON true is not 1)
_BASE_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "target_modules": ((list, str), "a list of module-name suffixes, a regex string or 'all-linear'"),
    "adapter_dtype": ((str,), "a dtype name such as 'float32'"),
    "base_model_name_or_path": ((str, type(None)), "a path or repo id, or null"),
    "base_model_revision": ((str, type(None)), "a commit hash or revision name, or null"),
    "mask_fingerprint": ((dict, type(None)), "a fingerprint object, or null"),
    "spp_hf_version": ((str, type(None)), "a version string, or null"),
    "format_version": ((int,), "an integer"),
}


def _check_types(config: "AdapterConfig") -> None:
    cls = type(config).__name__
    for name, (types, wanted) in {**_BASE_FIELD_TYPES, **config._field_types}.items():
        value = getattr(config, name)
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if name == "target_modules" and isinstance(value, list):
            wrong = not all(isinstance(t, str) for t in value)
        if wrong:
            raise ValueError(f"{cls}.{name} must be {wanted}, got {value!r} ({type(value).__name__})")


_MISSING = object()
_FINGERPRINT_FIX = (
    "spp-hf writes the fingerprint when it saves an adapter: save the adapter again, or remove mask_fingerprint "
    "to have it measured from the base (loading then does not check the base's zeros)"
)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_fingerprint(cls: str, fingerprint: dict | None) -> None:
    """Refuse a mask fingerprint not shaped as `sparsity.fingerprint_modules` builds it, naming the entry."""
    if fingerprint is None:
        return

    def refuse(where: str, wanted: str, value: Any) -> ValueError:
        got = "nothing (the key is missing)" if value is _MISSING else repr(value)
        got = got if len(got) <= 80 else got[:77] + "..."
        return ValueError(f"{cls}.mask_fingerprint{where} must be {wanted}, got {got}. {_FINGERPRINT_FIX}")

    total = fingerprint.get("hash", _MISSING)
    if not isinstance(total, str) or not total:
        raise refuse("['hash']", "a hex string (the hash over every module's mask)", total)
    modules = fingerprint.get("modules", _MISSING)
    if not isinstance(modules, dict) or not modules:
        raise refuse("['modules']", "a non-empty object mapping module names to {shape, zeros, hash}", modules)
    for name, entry in modules.items():
        if not isinstance(name, str) or not name:
            raise refuse("['modules']", "keyed by module names", name)
        where = f"['modules'][{name!r}]"
        if not isinstance(entry, dict):
            raise refuse(where, "an object with 'shape', 'zeros' and 'hash'", entry)
        shape, zeros, digest = (entry.get(key, _MISSING) for key in ("shape", "zeros", "hash"))
        if not isinstance(shape, list) or len(shape) != 2 or not all(_is_count(d) for d in shape):
            raise refuse(where + "['shape']", "[out_features, in_features], two non-negative integers", shape)
        if not _is_count(zeros) or zeros > shape[0] * shape[1]:
            raise refuse(where + "['zeros']", f"the number of zeros, an integer from 0 to {shape[0] * shape[1]}", zeros)
        if not isinstance(digest, str) or not digest:
            raise refuse(where + "['hash']", "a hex string (the hash of the module's mask)", digest)


def _version() -> str:
    from .. import __version__

    return __version__


# method name -> config class, filled by each class definition below
ADAPTER_METHODS: dict[str, type["AdapterConfig"]] = {}


@dataclass(kw_only=True)
class AdapterConfig:
    """What every spp-hf adapter config holds (keyword-only in the subclasses).

    Args:
        target_modules: module-name suffixes, a regex string, or "all-linear" (every linear layer
            except the output embedding).
        adapter_dtype: dtype of the adapter's tensors, independent of the base dtype.
        base_model_name_or_path, base_model_revision: the pruned base the adapter belongs to (recorded
            by `get_spp_model` / `add_adapter` where not set here; the revision is pinned to a commit on push).
        mask_fingerprint: zero masks of the base's target layers, always measured by `get_spp_model` /
            `add_adapter` on the base the adapter is added to; loading refuses a base with other zeros.
        spp_hf_version, format_version: which spp-hf wrote the file, and its format.
    """

    method: ClassVar[str] = ""
    _field_types: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {}

    target_modules: Union[list[str], str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    adapter_dtype: str = "float32"
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    mask_fingerprint: dict | None = None
    spp_hf_version: str | None = None
    format_version: int = FORMAT_VERSION

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            ADAPTER_METHODS[cls.method] = cls

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig:
            raise TypeError("AdapterConfig is the shared base; use SPPConfig(...) or MaskedLoRAConfig(...).")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        _check_types(self)
        name = type(self).__name__
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"{name}.adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        _check_fingerprint(name, self.mask_fingerprint)
        self.validate()

    def validate(self) -> None:
        """Check the method's own fields (types are already checked); may normalise them."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def file_dict(self) -> dict[str, Any]:
        """The data written to `spp_config.json`: `to_dict()` stamped with this spp-hf's version."""
        return {**self.to_dict(), "spp_hf_version": _version()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build a config from JSON data, refusing files from a newer, incompatible spp-hf.

        On `AdapterConfig` it returns the class the data's `method` names; on a subclass it refuses data
        of another method.
        """
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ValueError(
                f"This adapter was saved by spp-hf {data.get('spp_hf_version', '?')} with format version "
                f"{version}; this spp-hf ({_version()}) reads up to format {FORMAT_VERSION}. "
                "Upgrade with `pip install -U spp-hf`."
            )
        method = data.get("method", DEFAULT_METHOD)
        target = ADAPTER_METHODS.get(method) if isinstance(method, str) else None
        if target is None:
            raise ValueError(
                f"method must be one of {sorted(ADAPTER_METHODS)}, got {method!r}: the adapter was written by another "
                "tool or a newer spp-hf. Upgrade with `pip install -U spp-hf`, or fix the method field."
            )
        if cls is not AdapterConfig and target is not cls:
            raise ValueError(
                f"method is {method!r}: this is a {target.__name__} adapter, not a {cls.__name__} one. Load it with "
                f"{target.__name__}.from_dict(...) or SPPModel.from_pretrained / model.load_adapter, which read the "
                "method from the file."
            )
        known = {f.name for f in dataclasses.fields(target)}
        return target(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `spp_config.json` atomically and return its path."""
        path = Path(save_directory) / CONFIG_NAME
        write_json(path, self.file_dict())
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "AdapterConfig":
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
        return cls.from_file_data(data, path)

    @classmethod
    def from_file_data(cls, data: dict[str, Any], path: str | os.PathLike) -> "AdapterConfig":
        """`from_dict` on the parsed contents of the config file `path`; a bad field is reported with the file."""
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            if "pip install -U spp-hf" in str(err) and "method" not in str(err):
                raise
            raise ValueError(
                f"{path} has an invalid field: {err}. Fix that field in the file, or save or download the adapter again."
            ) from None


@dataclass
class SPPConfig(AdapterConfig):
    """Settings of an SPP adapter (paper Sec. 3.2, Eq. 4-5). Shared fields: see `AdapterConfig`.

    Args:
        r: rows of α (r × in_features); each α row scales out_features / r consecutive output rows.
        scale: s in Eq. 5. 2.0 matches the official recipe (lora_alpha / lora_r).
        dropout: dropout on the input of the SPP branch.
        impl: "naive" (materialise W'), "blocked" (Eq. 7), "fused" (one GEMM on W_eff) or "auto".
        use_beta: ablation of Table 4; False freezes β at 1 (α is then zero-initialised).
        zero_init: which factor starts at zero so the model starts as the pruned base:
            "beta" (paper default, α kaiming-uniform) or "alpha" (Table 8 ablation).
    """

    method: ClassVar[str] = "spp"
    _field_types: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {
        "r": ((int,), "a positive integer"),
        "scale": ((int, float), "a number"),
        "dropout": ((int, float), "a number in [0, 1)"),
        "impl": ((str,), f"one of {IMPLS}"),
        "use_beta": ((bool,), "true or false"),
        "zero_init": ((str,), "'beta' or 'alpha'"),
    }

    r: int = 16
    scale: float = 2.0
    dropout: float = 0.0
    impl: Literal["auto", "naive", "blocked", "fused"] = "auto"
    use_beta: bool = True
    zero_init: Literal["beta", "alpha"] = "beta"

    def validate(self) -> None:
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
        if not self.use_beta and self.zero_init != "alpha":
            # Without a trainable β, α must start at zero for the model to start as the pruned base.
            self.zero_init = "alpha"


@dataclass
class MaskedLoRAConfig(AdapterConfig):
    """Settings of a masked-LoRA adapter: LoRA whose update is multiplied by the base's zero mask.

    Per target layer A (r × in_features, kaiming-uniform) and B (out_features × r, zeros) train, and
    Y = X Wᵀ + (lora_alpha / r) · Dropout(X) ((B A) ⊙ M)ᵀ with M = (W ≠ 0); the merge W + (lora_alpha / r)·(B A) ⊙ M
    keeps exactly W's zeros. Shared fields: see `AdapterConfig`.

    Args:
        r: LoRA rank (any positive integer; it need not divide out_features).
        lora_alpha: the update is scaled by lora_alpha / r, as in PEFT's LoRA.
        dropout: dropout on the input of the LoRA branch.
    """

    method: ClassVar[str] = "masked_lora"
    _field_types: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {
        "r": ((int,), "a positive integer"),
        "lora_alpha": ((int, float), "a finite number"),
        "dropout": ((int, float), "a number in [0, 1)"),
    }

    r: int = 8
    lora_alpha: float = 16
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        """lora_alpha / r, the factor on the masked update."""
        return self.lora_alpha / self.r

    def validate(self) -> None:
        if not self.r >= 1:
            raise ValueError(f"MaskedLoRAConfig.r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.lora_alpha):
            raise ValueError(f"MaskedLoRAConfig.lora_alpha must be a finite number, got {self.lora_alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MaskedLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")


__all__ = ["AdapterConfig", "CONFIG_NAME", "MaskedLoRAConfig", "SPPConfig", "WEIGHTS_NAME"]
