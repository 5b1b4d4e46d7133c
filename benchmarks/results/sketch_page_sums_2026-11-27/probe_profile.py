"""Per-kernel GPU time of one bound decode call on a real capture (torch.profiler), with the
bound pre-pass's sketch tile as a variant.

Run from benchmarks/: SKETCH_TILE_TOKENS=128 python3 results/sketch_page_sums_2026-11-27/probe_profile.py CAPTURES MODEL:LAYER
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from real_batch import build_real_batch, load_layer, plan_art  # noqa: E402

import art_runtime.decode  # noqa: E402
from art_runtime import PageMetadata, TerminationConfig  # noqa: E402
from art_runtime.policies import DensePolicy  # noqa: E402

if "SKETCH_TILE_TOKENS" in os.environ:
    art_runtime.decode.SKETCH_TILE_TOKENS = int(os.environ["SKETCH_TILE_TOKENS"])
launch = {key: int(os.environ[f"SKETCH_{key.upper()}"]) for key in ("maxnreg", "num_warps", "num_stages")
          if f"SKETCH_{key.upper()}" in os.environ}
if launch:  # the sketch kernel launched with these options
    import art_runtime.kernels.page_bounds as page_bounds

    class _Launch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **launch)

    page_bounds.page_sketch_bound_kernel = _Launch(page_bounds.page_sketch_bound_kernel)
captures = Path(sys.argv[1])
model, layer_id = (sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-0.5b:12").split(":")
batch = build_real_batch(load_layer(captures, model, int(layer_id)), 64, "cuda")
meta = PageMetadata.from_cache(batch.paged_kv_cache, *batch.page_table)
term = TerminationConfig(mode="bound", eps=0.05, relative_to="values")
run, _, _ = plan_art(batch, DensePolicy(order="quest"), term, meta, "triton")
for _ in range(50):
    run()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        run()
    torch.cuda.synchronize()
for event in prof.key_averages():
    if event.device_type == torch.autograd.DeviceType.CUDA and "kernel" in event.key:
        print(f"{event.key[:40]:40s} {event.device_time / 1:9.1f} us x{event.count // 10}")
