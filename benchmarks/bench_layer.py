"""Forward+backward time and saved-activation memory of one wrapped linear layer, side by side.

Shapes are LLaMA-7B's (4096×4096 attention, 11008×4096 MLP), float32 on the CPU. Compared: the frozen
base linear alone (the floor: forward + dX), SPP naive / blocked / fused, masked LoRA r=8 fused (LoRA
whose update is multiplied by the zero mask, `spp_hf.adapters.masked_lora`), PEFT LoRA r=8, and PEFT adapters
through `spp_hf.get_sparse_peft_model`: masked PEFT LoRA r=8 (the generic masked-delta function), HiRA r=8 and
IA³ (PEFT's own multiplicative forwards) on the same layer. Input gradients are always computed, as inside a
network. Prints absolute numbers and ratios.

    python benchmarks/bench_layer.py            # the full table (several minutes on 2 cores)
    python benchmarks/bench_layer.py --quick    # small shapes, a smoke run
    python benchmarks/bench_layer.py --kinds base "masked lora r=8" "lora r=8"   # a subset
    python benchmarks/bench_layer.py --kinds "masked peft lora r=8" "hira r=8" ia3   # the sparse PEFT layers
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from spp_hf import MaskedLoRAConfig, SPPConfig, SPPLinear, get_sparse_peft_model

KINDS = ["base", "spp naive", "spp blocked", "spp fused", "masked lora r=8", "lora r=8", "masked peft lora r=8", "hira r=8", "ia3"]


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a base, SPP or PEFT-wrapped layer."""
    if isinstance(layer, SPPLinear):
        return layer.base_layer.weight
    if hasattr(layer, "base_model"):
        return layer.base_model.model.proj.base_layer.weight
    return layer.weight


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def make_layer(kind: str, base: nn.Linear) -> nn.Module:
    if kind == "base":
        return base.requires_grad_(False)
    if kind == "lora r=8":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(_Holder(base), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    if kind in ("masked peft lora r=8", "hira r=8", "ia3"):  # PEFT adapters kept on the base's non-zeros
        from peft import HiraConfig, IA3Config, LoraConfig

        config = {
            "masked peft lora r=8": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]),
            "hira r=8": lambda: HiraConfig(r=8, target_modules=["proj"]),
            "ia3": lambda: IA3Config(target_modules=["proj"], feedforward_modules=[]),
        }[kind]()
        model = get_sparse_peft_model(_Holder(base), config)
        with torch.no_grad():  # a trained adapter: LoRA / HiRA B ≠ 0, IA³ scales ≠ 1
            for name, param in model.named_parameters():
                if param.requires_grad and ("lora_B" in name or "hira_B" in name):
                    nn.init.normal_(param, std=0.01)
                elif param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.01)
        return model
    if kind == "masked lora r=8":  # the adapter layer as models use it (fused on a dense base)
        layer = SPPLinear(base, "default", MaskedLoRAConfig(r=8, lora_alpha=16))
        nn.init.normal_(layer.lora_B["default"], std=0.01)  # a trained adapter: B ≠ 0
        return layer
    layer = SPPLinear(base, "default", SPPConfig(r=16, scale=2.0, impl=kind.split()[-1]))
    nn.init.normal_(layer.spp_beta["default"], std=0.01)  # a trained adapter: β ≠ 0
    return layer


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward beyond parameters and the input (counted once per storage)."""
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return sum(seen.values())


def one_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x.grad = None
    t0 = time.perf_counter()
    layer(x).backward(grad)
    return time.perf_counter() - t0


def interleaved_times(layers: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, reps: int) -> dict[str, tuple[float, float]]:
    """Median seconds per step and median ratio to the base, with the methods run in turn each
    repetition, so a change in machine load hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in layers}
    for i in range(reps + 1):
        for kind, layer in layers.items():
            t = one_step(layer, x, grad)
            if i:  # the first round warms up allocator and kernels
                times[kind].append(t)
    base = times["base"]
    return {k: (statistics.median(v), statistics.median(a / b for a, b in zip(v, base))) for k, v in times.items()}


def relative(ratio: float, timed: dict[str, tuple[float, float]], to: str) -> str:
    """ratio as a multiple of another layer's ratio to the base, or '-' when that layer was not run."""
    return f"{ratio / timed[to][1]:.2f}" if to in timed else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS, help="layers to compare (base is always run)")
    args = parser.parse_args()
    shapes = [(1024, 1024, 256)] if args.quick else [(4096, 4096, 512), (11008, 4096, 512), (4096, 4096, 2048), (11008, 4096, 2048)]
    kinds = ["base", *(k for k in args.kinds if k != "base")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, forward+backward (dX and adapter grads)")
    for m, n, tokens in shapes:
        torch.manual_seed(0)
        base = nn.Linear(n, m, bias=False)
        with torch.no_grad():
            base.weight[torch.rand_like(base.weight) < 0.5] = 0
        x = torch.randn(tokens, n, requires_grad=True)
        grad = torch.randn(tokens, m)
        layers = {}
        for kind in kinds:
            layers[kind] = make_layer(kind, nn.Linear(n, m, bias=False).requires_grad_(False))
            with torch.no_grad():
                dense_weight(layers[kind]).copy_(base.weight)
        saved = {kind: saved_bytes(layer, x) for kind, layer in layers.items()}
        timed = interleaved_times(layers, x, grad, args.reps)
        print(f"\nW {m}x{n}, {tokens} tokens (ratios: median over {args.reps} interleaved rounds)")
        print(f"{'impl':<20} {'ms/step':>9} {'x base':>7} {'x naive':>8} {'x lora':>7} {'saved KiB':>10}")
        for kind, (t, ratio) in timed.items():
            print(
                f"{kind:<20} {t * 1e3:>9.1f} {ratio:>7.2f} {relative(ratio, timed, 'spp naive'):>8} "
                f"{relative(ratio, timed, 'lora r=8'):>7} {saved[kind] / 2**10:>10.1f}"
            )
        del layers


if __name__ == "__main__":
    main()
