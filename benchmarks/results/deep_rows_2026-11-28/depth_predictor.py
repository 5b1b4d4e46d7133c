"""How well the mass pre-pass's predicted depth (``block_suffix_kernel``: blocks at which some head's
estimated unread share is above a threshold, eps in the kernel) tracks the blocks a whole row really
reads under mode mass (float64 replay, eps 0.05). Usage: depth_predictor.py REC.pt ... (from this
folder; records of ../mass_estimate_limits_2026-11-28/split.py)."""
import sys, math, torch
sys.path.insert(0, ".")
import sim_runtime_split as s
def pred_at(r, share):
    n = r["pages"]
    blk = torch.stack([r["est"][:, b:b + s.BP].sum(1) for b in range(0, n, s.BP)], 1)
    suffix = blk.flip(1).cumsum(1).flip(1)
    return int(((suffix / suffix[:, :1]) > share).any(0).sum())
for path in sys.argv[1:]:
    rows = torch.load(path)
    actual = [math.ceil(s.run_chunk(r, 0, r["pages"], 0.05)[0] / s.BP) for r in rows]
    a = torch.tensor(actual, dtype=torch.float64)
    print("==", path, "actual blocks: median", int(a.median()), "max", int(a.max()))
    for share in (0.05, 0.025, 0.0125, 0.00625, 0.003):
        p = torch.tensor([pred_at(r, share) for r in rows], dtype=torch.float64)
        corr = float(torch.corrcoef(torch.stack([p, a]))[0, 1])
        ratio = (a / p.clamp(min=1))
        print(f"  share {share:.4f}: pred median {int(p.median())} max {int(p.max())}  corr {corr:.2f}  "
              f"actual/pred median {float(ratio.median()):.2f} p90 {float(ratio.quantile(0.9)):.2f}")
