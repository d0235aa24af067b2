#!/usr/bin/env bash
# Distributed check of SPP training through the recipe: DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on
# the GPUs of one machine (NPROC processes, default: all GPUs; sharding needs NPROC >= 2).
#
# For each launcher, on a tiny 2:4-pruned llama (fp32, dropout 0, 4 steps, global batch 8):
#   1. the adapter matches a single-process run with the same global batch (allclose),
#   2. resuming from checkpoint-2 ends at the same adapter as the uninterrupted run,
#   3. checkpoints hold no copy of the base (they are smaller than the base's weights),
#   4. the saved mask fingerprint equals the base's.
# DeepSpeed legs run only if `import deepspeed` works. Without a GPU, only the DDP leg runs, on 2 CPU
# processes (recipes/accelerate/cpu_ddp.yaml), which checks the script itself.
#
#   bash benchmarks/gpu_check_distributed.sh            # WORK=<dir> keeps the outputs, NPROC=<n> sets processes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD:$PWD/tests:${PYTHONPATH:-}"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
WORK=${WORK:-$(mktemp -d -t spp-dist-XXXX)}
if [ "$GPUS" -eq 0 ]; then
  NPROC=2; LEGS="ddp"; CPU_ARGS=(--use_cpu true); export OMP_NUM_THREADS=1
  echo "no GPU: running the DDP leg on 2 CPU processes only"
else
  NPROC=${NPROC:-$GPUS}; LEGS="ddp fsdp zero2 zero3"; CPU_ARGS=()
fi
if [ $((8 % NPROC)) -ne 0 ]; then echo "NPROC must divide 8 (the global batch)"; exit 2; fi
echo "work dir: $WORK, processes: $NPROC"

$PY -c "from fixtures_trainer import save_tiny_base; from pathlib import Path; save_tiny_base(Path('$WORK/base'))"

recipe() {  # recipe <launcher config> <num processes> <output dir> [extra args]
  local config=$1 nproc=$2 out=$3; shift 3
  accelerate launch --config_file "$config" --num_processes "$nproc" --mixed_precision no recipes/alpaca_sft.py \
    --model_name_or_path "$WORK/base" --dataset_name bundled --max_train_samples 64 --max_steps 4 \
    --per_device_train_batch_size $((8 / nproc)) --max_length 64 --spp_r 4 --spp_dropout 0.0 \
    --learning_rate 1e-2 --warmup_steps 0 --gradient_checkpointing false --bf16 false --logging_steps 1 \
    --save_strategy steps --save_steps 2 --seed 0 --report_to none --output_dir "$out" "${CPU_ARGS[@]}" "$@"
}

recipe recipes/accelerate/single_process.yaml 1 "$WORK/single"

for leg in $LEGS; do
  case $leg in
    ddp) config=recipes/accelerate/multi_gpu.yaml; [ "$GPUS" -eq 0 ] && config=recipes/accelerate/cpu_ddp.yaml ;;
    fsdp) config=recipes/accelerate/fsdp.yaml ;;
    zero2) config=recipes/accelerate/deepspeed_zero2.yaml ;;
    zero3) config=recipes/accelerate/deepspeed_zero3.yaml ;;
  esac
  if [[ $leg == zero* ]] && ! $PY -c "import deepspeed" 2>/dev/null; then
    echo "SKIP $leg: deepspeed is not installed (pip install deepspeed)"; continue
  fi
  echo "=== $leg ($config)"
  recipe "$config" "$NPROC" "$WORK/$leg"
  recipe "$config" "$NPROC" "$WORK/$leg-resumed" --resume_from_checkpoint "$WORK/$leg/checkpoint-2"
  $PY - "$WORK" "$leg" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from spp_hf import SPPConfig, get_spp_model

work, leg = Path(sys.argv[1]), sys.argv[2]
single = load_file(work / "single/spp_adapter.safetensors")
full, resumed = load_file(work / leg / "spp_adapter.safetensors"), load_file(work / f"{leg}-resumed/spp_adapter.safetensors")
assert set(full) == set(single) == set(resumed), "adapter keys differ"
worst = max(float((full[k] - single[k]).abs().max()) for k in single)
for k in single:
    torch.testing.assert_close(full[k], single[k], rtol=1e-3, atol=5e-5, msg=lambda m: f"{leg} vs single, {k}: {m}")
    torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{leg} resumed vs full, {k}: {m}")
base_bytes = (work / "base/model.safetensors").stat().st_size
ckpt_bytes = sum(p.stat().st_size for p in (work / leg / "checkpoint-2").rglob("*") if p.is_file())
assert ckpt_bytes < base_bytes / 2, f"{leg}: checkpoint-2 is {ckpt_bytes} bytes, the base {base_bytes}: base weights saved?"
saved = json.loads((work / leg / "spp_config.json").read_text())["mask_fingerprint"]["hash"]
model = get_spp_model(AutoModelForCausalLM.from_pretrained(work / "base"), SPPConfig(r=4))
assert saved == model.active_spp_config.mask_fingerprint["hash"], "mask fingerprint differs from the base's"
print(f"OK {leg}: max |Δ| vs single process {worst:.2e}; resume matches; checkpoint {ckpt_bytes} B < base {base_bytes} B")
EOF
done
