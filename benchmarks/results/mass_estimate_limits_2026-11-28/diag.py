"""Float64 record of mode mass's two estimated factors and their true values at every check of a capture layer.

Usage: python diag.py CAPTURE LAYER QUERIES OUT.pt  (then sim2.py OUT.pt ... replays stopping rules on them).
Whole rows (no split), mass order, 128-token checks, as `art-runtime analyze` runs mode mass.
"""
import sys, torch
from art_runtime.analysis import load_capture_layers, build_batch, _request_pages, _order_selection, _row_pages
from art_runtime.page_metadata import PageMetadata
from art_runtime.policies.base import PolicyContext

path, layer, nq, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
BP = 8  # pages per check
data = next(load_capture_layers(path, [layer]))
num_kv, n_tok, D = data.keys.shape
num_qo = data.queries.shape[0]; G = num_qo // num_kv
batch = build_batch(data.keys, data.values, data.queries, n_tok, nq, 16)
meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
ctx = PolicyContext(*batch.page_table, num_qo, num_kv, 16, sm_scale=data.scaling)
sel = _order_selection("mass", ctx, batch.q, meta)
rows = []  # per (b,h): dict of per-check arrays
for b in range(len(batch.lengths)):
    z, sv, page_max, o_ex, vscale = _request_pages(data, batch, b)
    M = page_max.amax(1)  # [H_q] head max logit (nats)
    n = batch.lengths[b]; pages = z.shape[1]
    phys = batch.kv_indices[int(batch.kv_indptr[b]): int(batch.kv_indptr[b + 1])].long()
    v_all = data.values[:, :n].double()
    vp = torch.nn.functional.pad(v_all, (0, 0, 0, pages * 16 - n)).view(num_kv, pages, 16, D)
    cnt = torch.full((pages,), 16.0, dtype=torch.float64); cnt[-1] = n - (pages - 1) * 16
    for h in range(num_kv):
        idx = _row_pages(sel, b * num_kv + h)  # logical page ids in visit order
        kmin, kmax = meta.key_bounds(phys[idx], torch.full_like(idx, h))
        kmin, kmax = kmin.double(), kmax.double()
        q = batch.q[b].double().view(num_kv, G, D)[h]  # [G, D]
        c, r = (kmin + kmax) / 2, (kmax - kmin) / 4
        est = (q @ c.T) * data.scaling + (q.square() @ r.square().T) * data.scaling**2 / 2 + torch.log(cnt[idx])[None]  # [G, c] nats
        hs = slice(h * G, (h + 1) * G)
        zz = z[hs][:, idx]  # relative to the head's largest logit
        est_rel = torch.exp(est - M[hs][:, None])  # same units as zz
        svv = sv[hs][:, idx]  # [G, c, D]
        cz, cs = zz.cumsum(1), svv.cumsum(1)
        tot_z = zz.sum(1)
        est_suffix = est_rel.flip(1).cumsum(1).flip(1)  # est mass of pages >= p
        vmean_blk = vp[h][idx].sum(1)  # [c, D] sum of values per page
        checks = []
        for end in range(BP, pages, BP):  # pages read = end (positions < end), rest remains
            L = cz[:, end - 1]; o_t = cs[:, end - 1] / L[:, None]
            W = tot_z - L
            share_t = W / (L + W)
            West = est_suffix[:, end]
            share_e = West / (L + West)
            vbar = (cs[:, -1] - cs[:, end - 1]) / W[:, None]
            pull_t = (vbar - o_t).norm(dim=-1)
            vblk = vmean_blk[end - BP:end].sum(0) / cnt[idx][end - BP:end].sum()
            pull_e = (vblk[None] - o_t).norm(dim=-1)
            err = (o_ex[hs] - o_t).norm(dim=-1) / o_ex[hs].norm(dim=-1)
            blk_t = cz[:, end - 1] - (cz[:, end - BP - 1] if end > BP else 0)
            blk_e = est_rel[:, end - BP:end].sum(1)
            checks.append(dict(blk_t=blk_t, blk_e=blk_e, read_e=est_rel[:, :end].sum(1), West=West, L=L, end=end, share_t=share_t, share_e=share_e, pull_t=pull_t, pull_e=pull_e,
                               onorm=o_t.norm(dim=-1), err=err))
        rows.append(dict(b=b, h=h, pages=pages, checks=checks))
torch.save(rows, out_path)
print("saved", len(rows), "rows")
