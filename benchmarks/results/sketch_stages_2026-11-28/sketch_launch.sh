#!/usr/bin/env bash
# The sweep of NOTES v44 on the device, from the repository root (captures in .whl/caps):
# page_sketch_bound_kernel's time (torch.profiler, one bound call, batch 64) at pipeline stages
# and tile lengths. The sweep itself ran on a scratch tree that also made the kernel's warps a
# constant (8 warps: slower everywhere); SKETCH_STAGES and SKETCH_TILE_TOKENS are the shipped
# constants.
bash benchmarks/install_on_device.sh /tmp/site >/dev/null 2>&1
export PYTHONUNBUFFERED=1
cd benchmarks
run() {  # stages tile_tokens layer
  PYTHONPATH=/tmp/site python3 -c "
import sys, runpy
import art_runtime.decode as d
d.SKETCH_STAGES, d.SKETCH_TILE_TOKENS = $1, $2
sys.argv = ['probe_profile.py', '../.whl/caps', '$3']
runpy.run_path('results/tail_order_2026-11-27/probe_profile.py', run_name='__main__')" 2>&1 |
    grep page_sketch_bound_kernel | awk -v t="stages=$1 tile=$2 $3" '{print t, $(NF-1)}'
}
for L in qwen2.5-0.5b:12 smollm2-135m:25 qwen2.5-0.5b:20; do
  for config in "3 128" "2 128" "1 128" "2 256" "2 64"; do run $config $L; done
done
