"""Per-kernel GPU time of one bound decode call on a real capture (torch.profiler).

Run from benchmarks/: python3 results/tail_order_2026-11-27/probe_profile.py CAPTURES_DIR [MODEL:LAYER]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from real_batch import build_real_batch, load_layer, plan_art  # noqa: E402

from art_runtime import PageMetadata, TerminationConfig  # noqa: E402
from art_runtime.policies import DensePolicy  # noqa: E402

import os  # noqa: E402

import art_runtime.decode  # noqa: E402

if "TAIL_SUFFIX_TILE" in os.environ:  # a launch variant
    art_runtime.decode.TAIL_SUFFIX_TILE = int(os.environ["TAIL_SUFFIX_TILE"])
captures = Path(sys.argv[1])
model, layer_id = (sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-0.5b:12").split(":")
batch = build_real_batch(load_layer(captures, model, int(layer_id)), 64, "cuda")
meta = PageMetadata.from_cache(batch.paged_kv_cache, *batch.page_table)
term = TerminationConfig(mode="bound", eps=0.05, relative_to="values")
run, _, _ = plan_art(batch, DensePolicy(order="quest"), term, meta, "triton")
for _ in range(5):
    run()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        run()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
