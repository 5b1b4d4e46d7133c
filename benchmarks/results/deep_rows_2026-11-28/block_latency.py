"""Per-block time of one decode program (no split): off vs mass (never fires), random data.
Usage: block_latency.py ROWS SWEEP (kv rows of 2048 pages each; 7 q heads per kv head, D 64). SWEEP
``stages``: pipeline stages 2-4 and passes of 8 or 16 blocks (block_latency_h200.txt); ``tiles``:
mode off's tile (64 / 128 / 256 tokens) and mode mass's check block (4 / 8 / 16 pages), per 128
tokens (block_latency_h100.txt)."""
import sys, torch
import art_runtime.decode as D
from art_runtime import BatchARTDecodeWrapper, TerminationConfig, PageMetadata
torch.manual_seed(0)
rows = int(sys.argv[1]); H_kv = 2; B = rows // H_kv; G = 7; Dh = 64; P = 16; pages = 2048
N = B * pages
kv = torch.randn(N, 2, P, H_kv, Dh, device="cuda", dtype=torch.bfloat16)
indptr = torch.arange(0, N + 1, pages, device="cuda", dtype=torch.int32)
indices = torch.randperm(N, device="cuda").to(torch.int32)
last = torch.full((B,), P, device="cuda", dtype=torch.int32)
q = torch.randn(B, H_kv * G, Dh, device="cuda", dtype=torch.bfloat16)
meta = PageMetadata.from_cache(kv, indptr, indices, last)
def prof(term, label):
    w = BatchARTDecodeWrapper()
    w.plan(indptr, indices, last, H_kv * G, H_kv, Dh, P, termination=term, chunk_pages=pages)
    run = lambda: w.run(q, kv, page_meta=meta)
    for _ in range(3): run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(10): run()
        torch.cuda.synchronize()
    for e in p.key_averages():
        if e.key.startswith("art_decode_kernel"):
            t = (getattr(e, "device_time_total", None) or e.cuda_time_total) / e.count
            print(f"rows {rows:4d} {label:28s} decode {t:8.1f} us  per 128 tokens {t / (pages // 8) * 1000:7.1f} ns")
if sys.argv[2] == "stages":
    for stages in (2, 3, 4):
        for pb in (8, 16):
            D.NUM_STAGES = stages; D.PASS_BLOCKS = pb
            if pb == 8:
                prof(TerminationConfig(mode="off"), f"off st{stages}")
            prof(TerminationConfig(mode="mass", eps=1e-12), f"mass st{stages} pass{pb}")
else:
    D.OFF_TILE_ELEMENTS = 65536
    for stages in (2, 3):
        D.NUM_STAGES = stages
        for tok in (64, 128, 256):
            D.OFF_BLOCK_TOKENS = tok
            prof(TerminationConfig(mode="off"), f"off st{stages} tile{tok}")
        D.OFF_BLOCK_TOKENS = 256
        for bp in (4, 8, 16):
            prof(TerminationConfig(mode="mass", eps=1e-12, block_pages=bp), f"mass st{stages} block{bp * 16}")
