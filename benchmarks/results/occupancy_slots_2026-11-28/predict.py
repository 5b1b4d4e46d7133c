"""Which plans change: the shipped rule (round(slots / rows), the wave model only where that
rounds to <= 1, 2 programs an SM) against the wave model at every row count on the slots that fit
(decode.off_programs_per_sm), with the wave model's own predicted time (blocks) for both. Run
from the tree before 245a15b for choose_chunk_pages's old rule."""
import math
from art_runtime.plan import choose_chunk_pages, wave_splits, MAX_CHUNKS_PER_ROW
def wave_all(longest, rows, bp, slots):
    rb = math.ceil(longest / bp)
    s = wave_splits(rows, rb, slots, max(1, min(MAX_CHUNKS_PER_ROW, rb // 2)))
    return longest if s <= 1 else max(2 * bp, math.ceil(longest / s))
def waves(longest, rows, chunk, slots, bp):
    items = rows * math.ceil(longest / chunk)
    return items, math.ceil(items / slots) * (math.ceil(chunk / bp) + 2)
for name, hkv, heads, per_sm_new in (("32/8/128", 8, 1, 2), ("14/2/64 per-head", 2, 1, 3), ("9/3/64", 3, 1, 3), ("14/2/64 fused", 2, 2, 2)):
    for kv in (4096, 8192, 32768):
        pages = kv // 16; bp = 8
        for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 37, 48, 64, 96, 128):
            rows = b * hkv
            old = choose_chunk_pages(pages, rows, bp, 264 * heads, False)
            new = wave_all(pages, rows, bp, 132 * per_sm_new * heads)
            if old != new:
                io, to = waves(pages, rows, old, 132*per_sm_new*heads, bp); inn, tn = waves(pages, rows, new, 132*per_sm_new*heads, bp)
                print(f"{name:18s} kv{kv:6d} b{b:4d} rows{rows:4d}: chunk {old:4d}->{new:4d} pages, items {io}->{inn}, model(true slots) {to}->{tn}")
