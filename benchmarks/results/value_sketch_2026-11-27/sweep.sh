#!/bin/bash
# One setting of the value-sketch prototype through `art-runtime analyze` (the torch backend's
# exact simulation) on both shared captures: VS_BITS value-sketch bits (0: the shipped bound),
# VS_CUT the key sketch's cut share (reference.SKETCH_CUT_SHARE), VS_F the split of the tail
# (pages whose suffix of sum_j U_j Vmax_j exceeds VS_F * eps * vscale * the box estimate of the
# row's mass read their value sketch, the rest keep the shipped term), VS_BOXORDER=1 visits the
# tail by the key-box estimate instead of the sketch bound, VS_GRID=int8|page the grid variants.
# Usage: PROTO=/path/to/patched/tree CAPTURES=/path/to/shared/data/captures OUT=dir sweep.sh BITS CUT [F]
# (every path absolute)
set -euo pipefail
out="$OUT/r_$1_$2_${3:-inf}${VS_BOXORDER:+_box}${VS_GRID:+_$VS_GRID}"
cd "$PROTO" && PYTHONPATH="$PROTO" VS_BITS=$1 VS_CUT=$2 VS_F=${3:-inf} python3 -m art_runtime analyze \
    "$CAPTURES/qwen2.5-0.5b_emma_16k.safetensors" "$CAPTURES/smollm2-135m_pride-prejudice_8k.safetensors" \
    --queries 8 --orders mass --setting "bound:eps=0.05,rel=values" --setting "bound:eps=0.1,rel=values" \
    --out-dir "$out" --no-plots --no-progress > "$out.log" 2>&1
