#!/usr/bin/env bash
# Mode off: the shipped plan (old tree) against slots from the compiled occupancy with the wave
# model at every row count (this tree), and the same model at 2 programs an SM (variant C).
set -u
export FLASHINFER_CUDA_ARCH_LIST=9.0a
R=$PWD
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > $OUT/gpu.txt
B="2 3 6 8 12 24 37 48 96"
cd /tmp
PYTHONPATH=/tmp/site_old:/tmp/site timeout 250 python3 $R/.whl/old/benchmarks/bench_decode.py --shapes 32/8/128 9/3/64 14/2/64 --batches $B --kv-lens 8192 32768 --iters 30 --out-dir $OUT/old > $OUT/old.log 2>&1
PYTHONPATH=/tmp/site timeout 230 python3 $R/benchmarks/bench_decode.py --shapes 32/8/128 9/3/64 14/2/64 --batches $B --kv-lens 8192 32768 --iters 30 --out-dir $OUT/new > $OUT/new.log 2>&1
PYTHONPATH=/tmp/site timeout 90 python3 $R/benchmarks/bench_decode.py --shapes 9/3/64 --batches 3 6 12 24 37 --kv-lens 8192 32768 --iters 30 --programs-per-sm 2 --out-dir $OUT/c2 > $OUT/c2.log 2>&1
tail -3 $OUT/*.log
