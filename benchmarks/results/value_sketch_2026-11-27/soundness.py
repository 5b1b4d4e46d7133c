"""Randomized float64 check of the value-sketch error bound (the inequality only, no kernel).

For unread tokens t with softmax weights w_t in [lo_t, hi_t] and values v_t inside their int4
sketch cells (centre c_t, half-width vector h_j of the token's page j), and any o:

    |sum_t w_t (v_t - o)| <= |S - M o| + sum_t r_t |c_t| + R |o| + sum_t hi_t |h_j|

with mid_t = (lo_t + hi_t) / 2, r_t = (hi_t - lo_t) / 2, M = sum mid_t, S = sum mid_t c_t,
R = sum r_t. Adversarial draws: values with large shared offsets, weights at their interval
ends, o at the tail's centre, at 0 and far away. Prints the largest ratio lhs / rhs (must be <= 1).
"""
import torch

torch.manual_seed(0)
dt = torch.float64
worst = 0.0
for trial in range(2000):
    pages, P, D, bits = int(torch.randint(1, 12, ())), 16, [8, 64, 128][trial % 3], 4
    offset = torch.randn(D, dtype=dt) * 10 ** float(torch.empty(()).uniform_(-2, 2))
    v = offset + torch.randn(pages, P, D, dtype=dt) * torch.rand(pages, 1, D, dtype=dt) * 3
    if trial % 4 == 0:
        v[..., : D // 2] = v[..., :1, : D // 2]  # constant dims: zero range
    lo = torch.exp(torch.randn(pages, P, dtype=dt) * 3)
    hi = lo * torch.exp(torch.rand(pages, 1, dtype=dt) * 2)
    pick = torch.rand(pages, P, dtype=dt)
    w = torch.where(pick < 0.3, lo, torch.where(pick < 0.6, hi, lo + (hi - lo) * torch.rand(pages, P, dtype=dt)))
    levels = 2**bits - 1
    vmin, vmax = v.amin(1), v.amax(1)
    step = torch.exp2(torch.ceil(torch.log2(((vmax - vmin) / levels).clamp(min=2.0**-24))))
    base = torch.floor(vmin / step) * step
    code = torch.floor((v - base[:, None]) / step[:, None]).clamp(0, levels)
    c = base[:, None] + (code + 0.5) * step[:, None]
    assert bool(((v - c).abs() <= step[:, None] / 2 * (1 + 1e-12)).all())
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    M, S, R = mid.sum(), (mid[..., None] * c).sum((0, 1)), rad.sum()
    Rb = (rad * c.norm(dim=-1)).sum()
    H = (hi.sum(1) * (step / 2).norm(dim=-1)).sum()
    for o in (S / M, torch.zeros(D, dtype=dt), (w[..., None] * v).sum((0, 1)) / w.sum(), offset + torch.randn(D, dtype=dt) * 100):
        lhs = ((w[..., None] * (v - o)).sum((0, 1))).norm()
        rhs = (S - M * o).norm() + Rb + R * o.norm() + H
        worst = max(worst, float(lhs / rhs))
print(f"largest lhs / rhs over 2000 draws x 4 o: {worst:.6f}")
assert worst <= 1.0
