#!/usr/bin/env bash
# The core grid, SmolLM2's shape at batch 64, a repeat of 32/8/128 batch 96, and the real
# captures: the shipped tree (old) and this tree in one call, alternating.
set -u
export FLASHINFER_CUDA_ARCH_LIST=9.0a
R=$PWD
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
(cd .whl/old && bash benchmarks/install_on_device.sh /tmp/site_old >/dev/null 2>&1)
cd /tmp
OLD="env PYTHONPATH=/tmp/site_old:/tmp/site python3 $R/.whl/old/benchmarks"
NEW="env PYTHONPATH=/tmp/site python3 $R/benchmarks"
for t in old new; do
  [ $t = old ] && P=$OLD || P=$NEW
  timeout 150 $P/bench_decode.py --iters 30 --out-dir $OUT/core_$t > $OUT/core_$t.log 2>&1
done
for t in new old; do
  [ $t = old ] && P=$OLD || P=$NEW
  timeout 60 $P/bench_decode.py --shapes 9/3/64 32/8/128 --batches 64 96 --kv-lens 8192 32768 --iters 30 --out-dir $OUT/odd_$t > $OUT/odd_$t.log 2>&1
  timeout 90 $P/bench_real_attention.py --captures $R/.whl/caps --settings default --iters 20 --out-dir $OUT/real_$t > $OUT/real_$t.log 2>&1
done
ls $OUT
