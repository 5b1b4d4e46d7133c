#!/usr/bin/env bash
# Two heads a program against one at group 4 with 4 KV heads (16/4/64) and MHA (32/32/64).
# quarter of each token's row) and 8/4/64 (tile a quarter full, half the token's row).
set -u
export FLASHINFER_CUDA_ARCH_LIST=9.0a
R=$PWD
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
cd /tmp
for v in two one; do
  if [ $v = two ]; then P="$R/benchmarks/bench_decode.py"; else P="$R/.whl/probe/one_head.py $R/benchmarks"; fi
  PYTHONPATH=/tmp/site timeout 200 python3 $P --shapes 16/4/64 32/32/64 --batches 4 16 48 64 128 --kv-lens 4096 16384 --iters 30 --out-dir $OUT/s_$v > $OUT/s_$v.log 2>&1
done
tail -n 1 $OUT/s_*.log
