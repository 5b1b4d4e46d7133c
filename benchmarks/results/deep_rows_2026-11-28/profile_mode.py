"""Per-kernel GPU time of one decode call on a real capture. Usage (from benchmarks/):
python3 results/deep_rows_2026-11-28/profile_mode.py CAPTURES MODEL:LAYER SETTING ORDER"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
from real_batch import build_real_batch, load_layer, plan_art
from art_runtime import PageMetadata
from art_runtime.analysis import parse_setting
from art_runtime.policies import DensePolicy

captures = Path(sys.argv[1])
model, layer_id = sys.argv[2].split(":")
term = parse_setting(sys.argv[3]).config
batch = build_real_batch(load_layer(captures, model, int(layer_id)), 64, "cuda")
meta = PageMetadata.from_cache(batch.paged_kv_cache, *batch.page_table)
run, _, stats = plan_art(batch, DensePolicy(order=sys.argv[4]), term, meta, "triton")
for _ in range(5):
    run()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        run()
    torch.cuda.synchronize()
print("==", sys.argv[2:], )
for e in prof.key_averages():
    if e.device_type.name == "CUDA" or True:
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            print(f"{e.key[:60]:60s} {t / e.count:9.1f} us x{e.count // 10}")
