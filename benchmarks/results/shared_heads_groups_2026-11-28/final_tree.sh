#!/usr/bin/env bash
# Final tree: GPU suite (decode, GPU-only, SGLang graph), and 32/8/64 + 32/32/64 as shipped now.
set -u
export FLASHINFER_CUDA_ARCH_LIST=9.0a
R=$PWD
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
cd /tmp
PYTHONPATH=/tmp/site timeout 300 python3 -m pytest -q -p no:cacheprovider $R/tests/test_decode.py $R/tests/test_gpu.py $R/tests/test_sglang_graph_gpu.py $R/tests/test_sglang_backend.py > $OUT/gpu_tests.log 2>&1
tail -n 3 $OUT/gpu_tests.log
PYTHONPATH=/tmp/site timeout 150 python3 $R/benchmarks/bench_decode.py --shapes 32/8/64 14/2/64 --batches 4 16 48 64 128 --kv-lens 4096 32768 --iters 30 --out-dir $OUT/final > $OUT/final.log 2>&1
grep -E "^\| (32|14)" $OUT/final.log | awk -F'|' '{print $2,$3,$4,$10,$11,$16}'
