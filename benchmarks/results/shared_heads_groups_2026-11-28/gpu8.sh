#!/usr/bin/env bash
# Same call: two heads a program at groups 4 and 8 on the same bytes (16/4/64 vs 32/4/64,
# 32/8/64 vs 64/8/64), and one head a program (the shipped rule at group 4).
set -u
export FLASHINFER_CUDA_ARCH_LIST=9.0a
R=$PWD
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
cd /tmp
PYTHONPATH=/tmp/site timeout 140 python3 $R/.whl/probe/two_heads.py $R/benchmarks --shapes 16/4/64 32/4/64 32/8/64 64/8/64 --batches 16 128 --kv-lens 4096 32768 --iters 30 --out-dir $OUT/two > $OUT/two.log 2>&1
PYTHONPATH=/tmp/site timeout 100 python3 $R/.whl/probe/one_head.py $R/benchmarks --shapes 16/4/64 32/4/64 32/8/64 64/8/64 --batches 16 128 --kv-lens 4096 32768 --iters 30 --out-dir $OUT/one > $OUT/one.log 2>&1
tail -n 1 $OUT/*.log
