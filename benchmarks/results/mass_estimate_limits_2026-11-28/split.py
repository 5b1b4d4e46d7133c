"""Float64 per-page record of a capture layer for split_sim.py: true page masses and weighted value
sums, the key-box mass estimate, value sums, in mass order. Usage: split.py CAPTURE LAYER QUERIES OUT.pt"""
import sys, torch
from art_runtime.analysis import load_capture_layers, build_batch, _request_pages, _order_selection, _row_pages
from art_runtime.page_metadata import PageMetadata
from art_runtime.policies.base import PolicyContext

path, layer, nq, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
BP = 8
data = next(load_capture_layers(path, [layer]))
num_kv, n_tok, D = data.keys.shape
num_qo = data.queries.shape[0]; G = num_qo // num_kv
batch = build_batch(data.keys, data.values, data.queries, n_tok, nq, 16)
meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
ctx = PolicyContext(*batch.page_table, num_qo, num_kv, 16, sm_scale=data.scaling)
sel = _order_selection("mass", ctx, batch.q, meta)
rows = []
for b in range(len(batch.lengths)):
    z, sv, page_max, o_ex, vscale = _request_pages(data, batch, b)
    M = page_max.amax(1)
    n = batch.lengths[b]; pages = z.shape[1]
    phys = batch.kv_indices[int(batch.kv_indptr[b]): int(batch.kv_indptr[b + 1])].long()
    vp = torch.nn.functional.pad(data.values[:, :n].double(), (0, 0, 0, pages * 16 - n)).view(num_kv, pages, 16, D)
    cnt = torch.full((pages,), 16.0, dtype=torch.float64); cnt[-1] = n - (pages - 1) * 16
    for h in range(num_kv):
        idx = _row_pages(sel, b * num_kv + h)
        kmin, kmax = (x.double() for x in meta.key_bounds(phys[idx], torch.full_like(idx, h)))
        q = batch.q[b].double().view(num_kv, G, D)[h]
        c, r = (kmin + kmax) / 2, (kmax - kmin) / 4
        est = (q @ c.T) * data.scaling + (q.square() @ r.square().T) * data.scaling**2 / 2 + torch.log(cnt[idx])[None]
        hs = slice(h * G, (h + 1) * G)
        rows.append(dict(z=z[hs][:, idx], sv=sv[hs][:, idx], est=torch.exp(est - M[hs][:, None]),
                         vsum=vp[h][idx].sum(1), cnt=cnt[idx], o_ex=o_ex[hs], pages=pages))
torch.save(rows, out_path)
print("saved", len(rows))
