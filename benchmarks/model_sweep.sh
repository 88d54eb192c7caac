#!/usr/bin/env bash
# The one command behind the model table in benchmarks/RESULTS.md:
# LLaMA-3-70B shapes, tensor parallel over every GPU of this host, prefill at
# 1024/4096/8192 prompt tokens (TTFT proxy) and decode steps at batch 1/16/64,
# NCCL vs each flashcomm mode.
#
#   bash benchmarks/model_sweep.sh [JSON_PATH]
#
# Writes JSON_PATH (default benchmarks/results/model-llama3-70b-<N>x-<date>.json)
# and the same table as markdown next to it (.md).  Environment overrides:
#   NP       ranks (default: number of GPUs)      LAYERS  layers built and timed (default 80 = all;
#   REPEATS  timed runs per point (default 3)              fewer are scaled to 80 and the output says so)
#   BITS     flashcomm modes (default none,8,4/8,4)  MODEL  llama3-70b (default) or llama3-8b
#   MPIRUN   launcher (default mpirun, else mpiexec)  EXTRA  more `flashcomm model` options
set -euo pipefail
cd "$(dirname "$0")/.."
# NVLink multicast (NVLS) stays off: a program using it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1

MODEL=${MODEL:-llama3-70b}
NP=${NP:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NP" -ge 1 ] || { echo "no GPUs found (set NP)" >&2; exit 2; }
LAYERS=${LAYERS:-80}
REPEATS=${REPEATS:-3}
BITS=${BITS:-none,8,4/8,4}
JSON=${1:-benchmarks/results/model-${MODEL}-${NP}x-$(date +%Y%m%d-%H%M).json}
MD=${JSON%.json}.md

MPIRUN=${MPIRUN:-$(command -v mpirun || command -v mpiexec)}
LAUNCH=("$MPIRUN")
if "$MPIRUN" --version 2>/dev/null | grep -q "Open MPI"; then LAUNCH+=(--bind-to none); fi
if command -v flashcomm >/dev/null; then FC=(flashcomm); else FC=(python3 -m cli.main); export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; fi

set -x
"${LAUNCH[@]}" -n "$NP" "${FC[@]}" model --model "$MODEL" \
  --tokens 1024,4096,8192 --batch 1,16,64 --context 1024 --layers "$LAYERS" \
  --bits "$BITS" --dtype float16 --repeats "$REPEATS" --warmup 1 \
  --json "$JSON" --markdown "$MD" ${EXTRA:-}
