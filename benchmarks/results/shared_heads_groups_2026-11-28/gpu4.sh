#!/usr/bin/env bash
# The shared-heads test as mended; then two heads a program (shipped) against one, on the slots
# that fit (v53), at three shapes that read two heads a program.
set -u
export FLASHINFER_CUDA_ARCH_LIST=9.0a
R=$PWD
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
cd /tmp
PYTHONPATH=/tmp/site timeout 120 python3 -m pytest -q -p no:cacheprovider $R/tests/test_decode.py -k heads_read_together > $OUT/gpu_tests.log 2>&1
tail -n 2 $OUT/gpu_tests.log
for v in two one; do
  if [ $v = two ]; then P="$R/benchmarks/bench_decode.py"; else P="$R/.whl/probe/one_head.py $R/benchmarks"; fi
  PYTHONPATH=/tmp/site timeout 200 python3 $P --shapes 14/2/64 32/4/64 32/8/64 --batches 4 16 48 64 128 --kv-lens 4096 32768 --iters 30 --out-dir $OUT/h_$v > $OUT/h_$v.log 2>&1
done
tail -n 1 $OUT/h_*.log
