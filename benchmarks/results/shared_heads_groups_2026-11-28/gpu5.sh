#!/usr/bin/env bash
# Two heads a program against one where two rules for it disagree: 64/8/64 (tile full, a
# quarter of each token's row) and 8/4/64 (tile a quarter full, half the token's row).
set -u
export FLASHINFER_CUDA_ARCH_LIST=9.0a
R=$PWD
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
cd /tmp
for v in two one; do
  if [ $v = two ]; then P="$R/benchmarks/bench_decode.py"; else P="$R/.whl/probe/one_head.py $R/benchmarks"; fi
  PYTHONPATH=/tmp/site timeout 200 python3 $P --shapes 64/8/64 8/4/64 --batches 16 48 64 128 --kv-lens 4096 32768 --iters 30 --out-dir $OUT/r_$v > $OUT/r_$v.log 2>&1
done
tail -n 1 $OUT/r_*.log
