"""`get_sparse_peft_model`: PEFT's `get_peft_model` whose every targeted layer keeps the pruned base's zeros, in
training and in the merge.

For a frozen pruned weight W (out × in), M = (W ≠ 0) and an adapter whose PEFT layer gives ΔW =
`layer.get_delta_weight(adapter)` (PEFT's delta, its scaling included):

- **additive methods** (LoRA, LoHa, LoKr, VeRA, FourierFT): the layer computes
  Y = X Wᵀ + b + Dropout(X) (ΔW ⊙ M)ᵀ and the merge writes W + ΔW ⊙ M, so the update lives on W's non-zeros.
  Dropout is the method's own: LoRA's ``lora_dropout[adapter]`` and VeRA's ``vera_dropout[adapter]`` drop the
  input of the update, as PEFT does; LoHa / LoKr keep their LyCORIS semantics, ``module_dropout`` (the whole
  update skipped for a step with that probability) and ``rank_dropout`` (rows of ΔW dropped, rescaled as PEFT
  rescales them). FourierFT has no dropout.
- **multiplicative methods** (HiRA: W ⊙ (1 + B A); IA³: W scaled per row or column) keep zeros by construction:
  PEFT's own forward runs unchanged, and their merges are checked like the others.
- everything else is refused with a ValueError naming the methods above: rotations and normalisations
  (OFT, BOFT, DoRA and the other LoRA variants), whose merges change every entry, LoRA inits that rewrite the
  base weight (PiSSA, OLoRA, ...), and targets other than dense Linear / GPT-2 Conv1D layers (embeddings,
  convolutions, 4/8-bit layers).

How it attaches without re-implementing PEFT: after `get_peft_model`, each targeted tuner layer's class is swapped
for a subclass made once per PEFT class (`_sparse_layer_class`). Additive subclasses override ``forward`` (the
masked update through `_MaskedDeltaLinear`), ``get_delta_weight`` (returns ΔW ⊙ M, so PEFT's own merge writes
W + ΔW ⊙ M and its unmerge subtracts the same) and ``merge`` / ``unmerge``; multiplicative ones only ``merge`` /
``unmerge``. Every merge runs PEFT's merge on a copy of the weight and writes it back only if, in the base's dtype,
it is finite, every zero of W is still zero and no non-zero became zero (else ValueError, weights untouched);
the tuner (``peft_model.base_model``) gets a subclass too, so ``merge_and_unload()`` / ``merge_adapter()`` check
every layer before the first one is written, and ``add_adapter`` patches the layers it adds.

`_MaskedDeltaLinear` is memory-lean: it saves only X (and the dropout masks), recomputes ΔW and M in backward,
and chains ∂L/∂ΔW = (Gᵀ X_drop) ⊙ M into the adapter's parameters with ``torch.autograd.grad`` through PEFT's own
``get_delta_weight``, so any additive method works without per-method gradient code. ΔW ⊙ M and W + ΔW ⊙ M are
computed in at least float32; the GEMMs run in X's dtype, as the base layer's would. Weight-sized tensors exist
only transiently inside one call (ΔW as PEFT builds it, M, W_eff, Gᵀ X); M and W_eff reuse buffers on the CPU.

The returned PeftModel's class is swapped too (`_sparse_model_class`), for ``save_pretrained`` / ``push_to_hub`` /
``load_adapter`` with spp-hf's record of the base (`sparse_peft_files`: a masked adapter's folder is refused by plain
``PeftModel.from_pretrained``; load it with `spp_hf.load_sparse_peft_model` or `spp_hf.SPPModel.from_pretrained`).

Not covered yet: mixed-adapter batches (``adapter_names=`` in forward), 4/8-bit bases.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel, PeftType, get_peft_model
from peft.tuners.fourierft.layer import FourierFTLinear
from peft.tuners.hira.layer import Linear as HiraLinear
from peft.tuners.ia3.layer import Linear as IA3Linear
from peft.tuners.loha.layer import Linear as LoHaLinear
from peft.tuners.lokr.layer import Linear as LoKrLinear
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.tuners.vera.layer import Linear as VeraLinear
from torch import nn

from ..layer_weights import Conv1D, dense_weight
from ..sparsity import fingerprint_modules
from .chunked import compute_dtype, scratch
from .sparse_peft_files import SparsePeftModelMixin

SUPPORTED_METHODS = (
    "LoRA (plain: no DoRA or other LoRA variant, lora_bias=False), LoHa, LoKr, VeRA and FourierFT (their update is "
    "masked to the base's non-zeros), HiRA and IA³ (multiplicative: zeros kept by construction)"
)
ADDITIVE_PEFT_TYPES = (PeftType.LORA, PeftType.LOHA, PeftType.LOKR, PeftType.VERA, PeftType.FOURIERFT)  # masked
SUPPORTED_PEFT_TYPES = (*ADDITIVE_PEFT_TYPES, PeftType.HIRA, PeftType.IA3)
# LoRA initialisations that only set A and B (the others, e.g. PiSSA, OLoRA, CorDA, LoftQ, rewrite the base weight)
LORA_INITS_KEEPING_BASE = (True, False, "gaussian", "orthogonal")


@dataclass(frozen=True)
class _Additive:
    """How one additive PEFT layer class exposes what `_MaskedDeltaLinear` needs."""

    label: str
    adapters: Callable[[Any], Iterable[str]]  # the adapter names the layer holds
    input_dropout: Callable[[Any, str], nn.Module] | None  # the module applied to X before the update, if any
    delta_in_stored_layout: Callable[[Any], bool]  # get_delta_weight follows the stored weight (Conv1D: in × out)
    lycoris: bool = False  # module_dropout / rank_dropout semantics (LoHa, LoKr)


ADDITIVE: dict[type, _Additive] = {
    LoraLinear: _Additive("LoRA", lambda l: l.lora_A.keys(), lambda l, a: l.lora_dropout[a], lambda l: l.fan_in_fan_out),
    LoHaLinear: _Additive("LoHa", lambda l: l._available_adapters, None, lambda l: True, lycoris=True),
    LoKrLinear: _Additive("LoKr", lambda l: l._available_adapters, None, lambda l: True, lycoris=True),
    VeraLinear: _Additive("VeRA", lambda l: l.vera_lambda_d.keys(), lambda l, a: l.vera_dropout[a], lambda l: l.fan_in_fan_out),
    FourierFTLinear: _Additive("FourierFT", lambda l: l.fourierft_spectrum.keys(), None, lambda l: False),
}  # fmt: skip
MULTIPLICATIVE: dict[type, str] = {HiraLinear: "HiRA", IA3Linear: "IA³"}


def get_sparse_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """`peft.get_peft_model(model, peft_config, adapter_name)` whose targeted layers keep `model`'s zeros.

    Training updates and every merge (``merge_and_unload``, ``merge_adapter``) live on the non-zeros of the
    pruned base (see the module docstring for the methods and their semantics). A config or target this cannot
    guarantee is refused with a ValueError before training starts, and `model` is given back unwrapped. The
    returned model records ``spp_sparse_peft = {"mask_fingerprint": ..., "base_model_name_or_path": ...}``: the
    base's mask fingerprint over the targeted layers (`spp_hf.sparsity.fingerprint_modules`).
    """
    if isinstance(model, PeftModel):
        raise ValueError(
            "get_sparse_peft_model takes the base model; to add an adapter to a PeftModel, call its add_adapter."
        )
    _check_config(peft_config)
    trains = {param: param.requires_grad for param in model.parameters()}
    peft_model = get_peft_model(model, peft_config, adapter_name=adapter_name)
    tuner = peft_model.base_model
    try:
        _patch_layers(tuner)
    except ValueError:
        tuner.unload()  # the model the caller passed, as it was (PEFT wraps it in place)
        for param, flag in trains.items():
            param.requires_grad_(flag)
        raise
    tuner.__class__ = _sparse_tuner_class(type(tuner))
    peft_model.__class__ = _sparse_model_class(type(peft_model))
    return peft_model


# --------------------------------------------------------------------------- checks before and after injection
def _refusal(what: str) -> ValueError:
    return ValueError(f"{what} cannot keep the pruned base's zeros. Sparsity-preserving PEFT supports {SUPPORTED_METHODS}.")


def _check_config(config: PeftConfig) -> None:
    """Refuse methods, LoRA variants and LoRA inits whose training or merge changes the base's zeros."""
    peft_type = getattr(config, "peft_type", None)
    if peft_type not in SUPPORTED_PEFT_TYPES:
        name = getattr(peft_type, "value", peft_type)
        kind = "rotates or rescales every weight entry" if name in ("OFT", "BOFT", "HRA", "ROAD") else "is not supported"
        raise _refusal(f"PEFT method {name} ({kind}):")
    if peft_type == PeftType.LORA:
        if config.use_dora:
            raise _refusal("LoRA with use_dora=True (DoRA renormalises every column of the merged weight):")
        variants = _lora_variants_requested(config)
        if variants:
            raise _refusal(f"LoRA with the variant(s) {variants}:")
        if config.lora_bias:
            raise _refusal("LoRA with lora_bias=True (an extra bias term outside get_delta_weight):")
        init = config.init_lora_weights
        if not any(init is ok or (isinstance(init, str) and init == ok) for ok in LORA_INITS_KEEPING_BASE):
            raise _refusal(
                f"LoRA with init_lora_weights={init!r} (it rewrites the base weight; use one of {LORA_INITS_KEEPING_BASE}):"
            )


def _lora_variants_requested(config: PeftConfig) -> list[str]:
    """The LoRA variants a LoraConfig turns on, read from the fields' own PEFT metadata."""
    found = []
    for field in dataclasses.fields(config):
        if field.name == "init_lora_weights":
            found += [v for v in field.metadata.get("lora_variants", ()) if config.init_lora_weights == v]
        elif field.metadata.get("is_lora_variant") and getattr(config, field.name):
            found.append(field.name)
    return found


def _check_layer(name: str, layer: nn.Module) -> None:
    """Refuse a tuner layer this module cannot keep sparse (its class, its base layer, its settings)."""
    cls = _peft_class(layer)
    if cls not in ADDITIVE and cls not in MULTIPLICATIVE:
        raise _refusal(f"The target {name!r} ({cls.__module__}.{cls.__name__}, e.g. an embedding or convolution):")
    base = layer.get_base_layer()
    if type(base) not in (nn.Linear, Conv1D):
        raise _refusal(
            f"The target {name!r} on a {type(base).__name__} base (only dense nn.Linear / Conv1D: load a 4/8-bit base "
            "in full precision):"
        )
    if isinstance(layer, LoraLinear):
        if layer.lora_variant:
            raise _refusal(f"LoRA variants {sorted(layer.lora_variant)} on {name!r}:")
        if any(layer.lora_bias.values()):
            raise _refusal(f"lora_bias on {name!r}:")
    spec = ADDITIVE.get(cls)
    if spec is not None and spec.input_dropout is not None:
        for adapter in spec.adapters(layer):
            module = spec.input_dropout(layer, adapter)
            if type(module) not in (nn.Dropout, nn.Identity):
                raise _refusal(f"The dropout {type(module).__name__} of {name!r} (only nn.Dropout / nn.Identity):")


def _holds_adapters(layer: nn.Module) -> bool:
    """Whether a tuner layer holds any adapter (one left empty by a refused ``add_adapter`` is inert)."""
    return any(len(getattr(layer, name, None) or ()) for name in layer.adapter_layer_names)


def _peft_class(layer: nn.Module) -> type:
    """The PEFT class of a tuner layer, patched or not."""
    return getattr(type(layer), "_spp_peft_class", type(layer))


def _patch_layers(tuner: nn.Module) -> None:
    """Check every tuner layer of `tuner.model`, then swap their classes; record the targets' mask fingerprint."""
    layers = [
        (name, module)
        for name, module in tuner.model.named_modules()
        if isinstance(module, BaseTunerLayer) and _holds_adapters(module)
    ]
    for name, layer in layers:
        _check_layer(name, layer)
    for _, layer in layers:
        if not hasattr(type(layer), "_spp_peft_class"):
            layer.__class__ = _sparse_layer_class(type(layer))
    with torch.no_grad():
        fingerprint = fingerprint_modules((name, dense_weight(layer.get_base_layer())) for name, layer in layers)
    configs = getattr(tuner, "peft_config", {})
    first = next(iter(configs.values()), None)
    tuner.spp_sparse_peft = {
        "mask_fingerprint": fingerprint,
        "base_model_name_or_path": getattr(first, "base_model_name_or_path", None),
    }


# --------------------------------------------------------------------------- patched layer classes
_LAYER_CLASSES: dict[type, type] = {}
_TUNER_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _register(cls: type, name: str) -> type:
    """Make a generated class importable under its name here (pickle and copy find it)."""
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls


def _sparse_layer_class(cls: type) -> type:
    """The sparsity-preserving subclass of a PEFT layer class, made once per class."""
    if cls not in _LAYER_CLASSES:
        prefix = cls.__module__.split(".")[-2].capitalize()  # peft.tuners.<method>.layer
        name = f"Sparse{prefix}{cls.__name__}"
        if cls in ADDITIVE:
            body = {"_spp_peft_class": cls, "_spp_spec": ADDITIVE[cls]}
            _LAYER_CLASSES[cls] = _register(type(name, (_SparseAdditiveLayer, cls), body), name)
        else:
            _LAYER_CLASSES[cls] = _register(type(name, (_CheckedMergeLayer, cls), {"_spp_peft_class": cls}), name)
    return _LAYER_CLASSES[cls]


def _sparse_tuner_class(cls: type) -> type:
    if cls not in _TUNER_CLASSES:
        name = f"Sparse{cls.__name__}"
        _TUNER_CLASSES[cls] = _register(type(name, (_SparseTuner, cls), {}), name)
    return _TUNER_CLASSES[cls]


def _sparse_model_class(cls: type) -> type:
    """The PeftModel class (e.g. PeftModelForCausalLM) with spp-hf's save / load (`SparsePeftModelMixin`), made once."""
    if cls not in _MODEL_CLASSES:
        name = f"Sparse{cls.__name__}"
        _MODEL_CLASSES[cls] = _register(type(name, (SparsePeftModelMixin, cls), {}), name)
    return _MODEL_CLASSES[cls]


class _CheckedMergeLayer:
    """Mixin: PEFT's merge, written back only if the base's zeros survive it; unmerge keeps exact zeros."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        _checked_merge(self, super().merge, safe_merge, adapter_names, write=True)

    def unmerge(self) -> None:
        if not self.merged:
            return super().unmerge()
        weight = self.get_base_layer().weight
        zeros = weight.data == 0
        super().unmerge()
        weight.data.masked_fill_(zeros, 0)


class _SparseAdditiveLayer(_CheckedMergeLayer):
    """Mixin for additive PEFT layers: the update is ΔW ⊙ M in forward, backward and merge."""

    _spp_peft_class: type
    _spp_spec: _Additive

    def get_delta_weight(self, adapter: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's delta times the base's non-zero mask (exact zeros where W is zero), in PEFT's layout."""
        delta = self._spp_peft_class.get_delta_weight(self, adapter, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight if self._spp_spec.delta_in_stored_layout(self) else dense_weight(base)
        if delta.shape != weight.shape:
            raise _shape_error(self, delta, weight)
        return delta.masked_fill(weight == 0, 0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(
                "Mixed-adapter batches (adapter_names=...) are not supported by sparse PEFT layers; use set_adapter."
            )
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        branches = _active_branches(self)
        if not branches:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"A sparse PEFT layer takes only its input tensor; got extra arguments {list(kwargs) or args}.")
        base = self.get_base_layer()
        weight = dense_weight(base)
        if weight.requires_grad and torch.is_grad_enabled():  # the base trains too: plain autograd, W gets its gradient
            return _masked_delta_reference(self, x, branches)
        params = [p for branch in branches for p in branch.params]
        return _MaskedDeltaLinear.apply(x, base.bias, (self, branches), *params)


# --------------------------------------------------------------------------- the masked update
@dataclass
class _Branch:
    """One active adapter's update in one forward: its input-dropout rate, LyCORIS row scale and parameters."""

    adapter: str
    dropout_p: float
    row_scale: torch.Tensor | None
    params: list[nn.Parameter]


def _active_branches(layer: Any) -> list[_Branch]:
    """The active adapters of `layer` with this step's dropout draws, as PEFT's forward would draw them."""
    spec = layer._spp_spec
    held = set(spec.adapters(layer))
    branches = []
    for adapter in layer.active_adapters:
        if adapter not in held:
            continue
        row_scale, p = None, 0.0
        if spec.lycoris and layer.training:
            module_p = layer.module_dropout[adapter]
            if module_p and not torch.rand(1) > module_p:
                continue  # LyCORIS module dropout: this update skipped for the step
            row_scale = _rank_dropout_rows(layer, adapter)
        elif spec.input_dropout is not None:
            module = spec.input_dropout(layer, adapter)
            p = float(module.p) if isinstance(module, nn.Dropout) and module.training else 0.0
        params = [p_ for p_ in _adapter_params(layer, adapter) if p_.requires_grad]
        branches.append(_Branch(adapter, p, row_scale, params))
    return branches


def _rank_dropout_rows(layer: Any, adapter: str) -> torch.Tensor | None:
    """LoHa / LoKr rank dropout: a 0/1 scale per output row, divided by its mean as PEFT does (LoKr only when
    ``rank_dropout_scale``), drawn once per step and reused in backward."""
    rate = layer.rank_dropout[adapter]
    if not rate:
        return None
    drop = (torch.rand(layer.out_features) > rate).float()
    if (isinstance(layer, LoHaLinear) or layer.rank_dropout_scale[adapter]) and drop.sum() > 0:
        drop /= drop.mean()
    return drop.to(layer.get_base_layer().weight.device)


def _adapter_params(layer: Any, adapter: str) -> list[nn.Parameter]:
    """The parameters of `adapter` in `layer` (PEFT's ``adapter_layer_names`` dicts keyed by the adapter)."""
    found = []
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr, None)
        if holder is None or adapter not in holder:
            continue
        item = holder[adapter]
        found += list(item.parameters()) if isinstance(item, nn.Module) else [item] if isinstance(item, nn.Parameter) else []
    return found


def _dense_delta(layer: Any, adapter: str) -> torch.Tensor:
    """PEFT's unmasked delta of `adapter` as an (out × in) tensor (Conv1D deltas in stored layout transposed)."""
    delta = layer._spp_peft_class.get_delta_weight(layer, adapter)
    base = layer.get_base_layer()
    if layer._spp_spec.delta_in_stored_layout(layer) and isinstance(base, Conv1D):
        delta = delta.t()
    weight = dense_weight(base)
    if delta.shape != weight.shape:
        raise _shape_error(layer, delta, weight)
    return delta


def _shape_error(layer: Any, delta: torch.Tensor, weight: torch.Tensor) -> ValueError:
    return ValueError(
        f"{layer._spp_spec.label}'s delta has shape {tuple(delta.shape)}, the base weight {tuple(weight.shape)}: "
        "set fan_in_fan_out=True in the PEFT config for GPT-2 style Conv1D layers, False for nn.Linear."
    )


def _nonzero_mask(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """M = (W ≠ 0) as 0/1 in `dtype`, in a buffer reused across calls on the CPU: a float mask multiplies
    many times faster than a bool mask fills or selects."""
    out = scratch("sparse_peft_mask", *weight.shape, dtype, weight.device)
    return weight.ne(0).to(dtype) if out is None else torch.ne(weight, 0, out=out)


def _scaled_rows(delta: torch.Tensor, dtype: torch.dtype, row_scale: torch.Tensor | None) -> torch.Tensor:
    delta = delta.to(dtype)
    return delta if row_scale is None else delta * row_scale.to(dtype).unsqueeze(1)


def _dropped(x2: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    return x2 * keep / (1.0 - p)


def _masked_delta_reference(layer: Any, x: torch.Tensor, branches: list[_Branch]) -> torch.Tensor:
    """Y = base(X) + Σ Dropout(X) (ΔW ⊙ M)ᵀ by plain autograd (used while the base weight trains)."""
    base = layer.get_base_layer()
    weight = dense_weight(base)
    zeros = weight.detach() == 0
    y = base(x)
    for branch in branches:
        delta = _scaled_rows(_dense_delta(layer, branch.adapter), compute_dtype(weight.dtype), branch.row_scale)
        x_branch = F.dropout(x, branch.dropout_p, training=True) if branch.dropout_p > 0 else x
        y = y + F.linear(x_branch, delta.masked_fill(zeros, 0).to(x.dtype))
    return y


def _branch_weights(
    weight: torch.Tensor, branches: list[_Branch], deltas: list[torch.Tensor], mask: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """W_eff = W + Σ ΔW ⊙ M over the branches without dropout (W itself when there are none, else one
    weight-sized buffer reused across calls on the CPU), and ΔW ⊙ M of each branch with dropout (None for the
    others), all in the mask's dtype."""
    w_eff, apart = None, []
    for branch, delta in zip(branches, deltas):
        part = _scaled_rows(delta, mask.dtype, branch.row_scale)
        if branch.dropout_p != 0.0:
            apart.append(part * mask)
        elif w_eff is None:
            apart.append(None)
            w_eff = torch.mul(part, mask, out=scratch("sparse_peft_w_eff", *weight.shape, mask.dtype, weight.device))
        else:
            apart.append(None)
            w_eff.addcmul_(part, mask)
    return (weight if w_eff is None else w_eff.add_(weight)), apart


class _MaskedDeltaLinear(torch.autograd.Function):
    """Y = X W_effᵀ + b + Σ_dropout-branches D(X) (ΔW ⊙ M)ᵀ, W_eff = W + Σ_other-branches ΔW ⊙ M; exact gradients
    for X, the bias and the adapters' parameters, none for W (frozen).

    Saves X and the dropout keep-masks only: ΔW (from PEFT's ``get_delta_weight``) and M = (W ≠ 0) are
    recomputed in backward, where dX = G W_eff (+ the dropout branches), ∂L/∂ΔW = (Gᵀ X_branch) ⊙ M (shared by
    the branches without dropout) and ``torch.autograd.grad`` carries it through ``get_delta_weight`` to the
    parameters. The layer and its branches travel as one non-tensor argument. M multiplies as a 0/1 float mask,
    so W_eff is exactly W's zeros wherever ΔW is finite (a non-finite ΔW is a diverged adapter; the merge, which
    writes with exact fills and checks, refuses it).
    """

    @staticmethod
    def forward(ctx, x, bias, layer_and_branches, *params):
        layer, branches = layer_and_branches
        weight = dense_weight(layer.get_base_layer())
        m, n = weight.shape
        x2 = x.reshape(-1, n)
        deltas = [_dense_delta(layer, branch.adapter) for branch in branches]
        w_eff, apart = _branch_weights(weight, branches, deltas, _nonzero_mask(weight, compute_dtype(weight.dtype)))
        y = F.linear(x2, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))
        keeps = []
        for branch, masked in zip(branches, apart):
            if masked is not None:
                keep = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - branch.dropout_p)
                keeps.append(keep)
                y = y.addmm_(_dropped(x2, keep, branch.dropout_p), masked.to(x.dtype).t())
        ctx.save_for_backward(x, *keeps)
        ctx.layer, ctx.branches = layer, branches
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, grad_out):
        x, *keeps = ctx.saved_tensors
        layer, branches = ctx.layer, ctx.branches
        weight = dense_weight(layer.get_base_layer())
        m, n = weight.shape
        x2 = x.reshape(-1, n)
        g = grad_out.reshape(-1, m).to(x.dtype)
        train = [bool(b.params) and any(ctx.needs_input_grad[3:]) for b in branches]
        with torch.enable_grad():  # ΔW with its graph back to the adapter's parameters
            tracked = [_dense_delta(layer, b.adapter) if t else None for b, t in zip(branches, train)]
        with torch.no_grad():
            mask = _nonzero_mask(weight, compute_dtype(weight.dtype))
            grad_x = None
            if ctx.needs_input_grad[0]:
                deltas = [_dense_delta(layer, b.adapter) if d is None else d.detach() for b, d in zip(branches, tracked)]
                w_eff, apart = _branch_weights(weight, branches, deltas, mask)
                grad_x = g @ w_eff.to(g.dtype)
                keep_iter = iter(keeps)
                for branch, masked in zip(branches, apart):
                    if masked is not None:
                        part = (g @ masked.to(g.dtype)).mul_(next(keep_iter))
                        grad_x.add_(part, alpha=1.0 / (1.0 - branch.dropout_p))
                grad_x = grad_x.view(x.shape)
            outputs, grad_outputs, shared, keep_iter = [], [], None, iter(keeps)
            for branch, delta in zip(branches, tracked):
                keep = next(keep_iter) if branch.dropout_p > 0.0 else None
                if delta is None:
                    continue
                if keep is None:
                    if shared is None:  # (Gᵀ X) ⊙ M, once for every branch without dropout
                        buf = scratch("sparse_peft_grad", m, n, x.dtype, x.device)
                        shared = torch.mm(g.t(), x2, out=buf).to(mask.dtype).mul_(mask)
                    grad_delta = shared
                else:
                    grad_delta = (g.t() @ _dropped(x2, keep, branch.dropout_p)).to(mask.dtype).mul_(mask)
                if branch.row_scale is not None:
                    grad_delta = grad_delta * branch.row_scale.to(mask.dtype).unsqueeze(1)
                outputs.append(delta)
                grad_outputs.append(grad_delta.to(delta.dtype))
        needs = ctx.needs_input_grad[3:]
        grads = [None] * len(needs)
        if outputs:
            params = [p for b in branches for p in b.params]
            wanted = [p for p, need in zip(params, needs) if need]
            found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
            grads = [next(found) if need else None for need in needs]
        grad_bias = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return (grad_x, grad_bias, None, *grads)


# --------------------------------------------------------------------------- checked merges
def _checked_merge(
    layer: Any, merge: Callable[..., None], safe_merge: bool, adapter_names: list[str] | None, write: bool
) -> None:
    """Run PEFT's `merge` on copies of the base weight and bias; write them back (zeros as W's own bits) only
    if the merged weight, in the base's dtype, is finite, keeps every zero of W and turns no non-zero into zero.
    Otherwise (or with ``write=False``, a dry run) the layer is left exactly as it was; a refusal raises."""
    base = layer.get_base_layer()
    weight, bias = base.weight, getattr(base, "bias", None)
    original_w = weight.data
    original_b = None if bias is None else bias.data
    state, merged = dict(vars(layer)), list(layer.merged_adapters)
    weight.data = original_w.clone()
    if bias is not None:
        bias.data = original_b.clone()
    try:
        merge(safe_merge=safe_merge, adapter_names=adapter_names)
        new_w = weight.data.to(original_w.dtype)
        new_b = None if bias is None else bias.data.to(original_b.dtype)
    except BaseException:
        _restore(layer, state, merged)
        raise
    finally:
        weight.data = original_w
        if bias is not None:
            bias.data = original_b
    problem = _merge_problem(original_w, new_w, new_b)
    if problem or not write:
        _restore(layer, state, merged)
    if problem:
        names = adapter_names if adapter_names is not None else layer.active_adapters
        raise ValueError(
            f"Refusing to merge adapter(s) {list(names)} into this layer: the merged weight {problem}. Nothing was written. "
            "The adapter is broken or diverged (lower the learning rate, clip gradients), or merge in float32."
        )
    if write:
        original_w.copy_(torch.where(original_w == 0, original_w, new_w))
        if bias is not None:
            original_b.copy_(new_b)


def _merge_problem(original: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why `merged` may not replace `original` (None when it may)."""
    if not torch.isfinite(merged).all():
        return "has non-finite values"
    if bias is not None and not torch.isfinite(bias).all():
        return "has a non-finite bias"
    zeros = original == 0
    filled = int((zeros & (merged != 0)).sum())
    if filled:
        return f"fills {filled} zeros of the pruned base"
    lost = int((~zeros & (merged == 0)).sum())
    if lost:
        return f"turns {lost} non-zeros into zeros (the mask would change)"
    return None


def _restore(layer: Any, state: dict, merged: list[str]) -> None:
    """Put back the layer attributes a merge attempt added or replaced (e.g. HiRA's saved pre-merge weight)."""
    current = vars(layer)
    for key in [k for k in current if k not in state]:
        del current[key]
    for key, value in state.items():
        if current.get(key) is not value:
            current[key] = value
    layer.merged_adapters[:] = merged


class _SparseTuner:
    """Mixin for the PEFT tuner (``peft_model.base_model``): every layer's merge is checked before any is
    written, and adapters added later are checked and patched like the first."""

    def _spp_check_merges(self, adapter_names: list[str] | None, safe_merge: bool) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's "already merged" notes: the real merge gives them
            for name, module in self.model.named_modules():
                if hasattr(type(module), "_spp_peft_class"):
                    try:
                        peft_merge = type(module)._spp_peft_class.merge.__get__(module)
                        _checked_merge(module, peft_merge, safe_merge, adapter_names, write=False)
                    except ValueError as error:
                        raise ValueError(f"{name}: {error}") from None

    def spp_masked(self, adapter_name: str) -> bool:
        """Whether the adapter's update is masked to the base's non-zeros (additive methods) rather than keeping
        the zeros by construction (HiRA, IA³)."""
        return self.peft_config[adapter_name].peft_type in ADDITIVE_PEFT_TYPES

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._spp_check_merges(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ):
        if merge:
            self._spp_check_merges(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        _check_config(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        try:
            _patch_layers(self)
        except ValueError:
            if len(self.peft_config) > 1:  # take the refused adapter out of the layers it reached
                self.delete_adapter(adapter_name)
            raise
