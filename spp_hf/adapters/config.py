"""`AdapterConfig`: what every adapter kind's config shares, saved as `spp_config.json` next to its weights.

The shared fields say what the adapter targets and which pruned base it belongs to; each kind's module
(`spp.py`, `masked_lora.py`) subclasses it with its own settings. The file records the adapter's `method`
(its kind's name; "spp" for files written before the field existed); `AdapterConfig.from_dict` builds the
config class of the kind registered under that name, and each class refuses a file of another method.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

from ..storage import CONFIG_NAME, WEIGHTS_NAME, write_json
from ..version import __version__
from .kinds import DEFAULT_KIND, KINDS, kind_named

FORMAT_VERSION = 1
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")

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

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig:
            kinds = ", ".join(f"{k.config_class.__name__}(...)" for k in KINDS.values())
            raise TypeError(f"AdapterConfig is the shared base; use one of its kinds' configs: {kinds}.")
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

    def targets_text(self) -> str:
        """`target_modules` as one line of text (a regex or "all-linear" as is, a list comma-separated)."""
        return self.target_modules if isinstance(self.target_modules, str) else ", ".join(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def file_dict(self) -> dict[str, Any]:
        """The data written to `spp_config.json`: `to_dict()` stamped with this spp-hf's version."""
        return {**self.to_dict(), "spp_hf_version": __version__}

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
                f"{version}; this spp-hf ({__version__}) reads up to format {FORMAT_VERSION}. "
                "Upgrade with `pip install -U spp-hf`."
            )
        method = data.get("method", DEFAULT_KIND)
        target = kind_named(method).config_class
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


__all__ = ["AdapterConfig", "CONFIG_NAME", "DEFAULT_TARGETS", "WEIGHTS_NAME"]
