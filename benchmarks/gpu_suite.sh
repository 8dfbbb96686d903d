#!/usr/bin/env bash
# The GPU benchmark suite in one device run: correctness of target="cuda" on the zoo, then the
# kernel and decode benchmarks. Usage (on a GPU machine): bash benchmarks/gpu_suite.sh [parts]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
parts="${1:-zoo,kernels}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[[ $parts == *zoo* ]] && python benchmarks/zoo_cuda.py
[[ $parts == *kernels* ]] && python benchmarks/kernels_gpu.py
[[ $parts == *attention* ]] && python benchmarks/latent_attention_gpu.py
[[ $parts == *attention* ]] && python benchmarks/latent_attention_gpu.py --llama
[[ $parts == *decode* ]] && python benchmarks/decode_gpu.py
exit 0
