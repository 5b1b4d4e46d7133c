import torch, math
from art_runtime import BatchARTDecodeWrapper, TerminationConfig
torch.manual_seed(0)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float32
def check(B, Hkv, G, D, P, layout, chunk_pages=None, lens=None):
    lens = lens or [int(x) for x in torch.randint(1, 6 * P, (B,))]
    pages = [math.ceil(l / P) for l in lens]
    indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0)), dtype=torch.int32)
    N = int(indptr[-1]) + 3
    indices = torch.randperm(N)[: int(indptr[-1])].to(torch.int32)
    last = torch.tensor([l - (p - 1) * P for l, p in zip(lens, pages)], dtype=torch.int32)
    shape = (N, 2, P, Hkv, D) if layout == "NHD" else (N, 2, Hkv, P, D)
    kv = torch.randn(shape).to(DEV, DT)
    q = torch.randn(B, Hkv * G, D).to(DEV, DT)
    indptr, indices, last = indptr.to(DEV), indices.to(DEV), last.to(DEV)
    w = BatchARTDecodeWrapper(kv_layout=layout, backend="triton")
    w.plan(indptr, indices, last, Hkv * G, Hkv, D, P, termination=TerminationConfig(mode="off"), chunk_pages=chunk_pages)
    hf = w._plan.heads_per_item
    out = torch.full_like(q, float("nan"))
    o, lse = w.run(q, kv, out=out, return_lse=True)
    st = w.last_stats
    # float64 reference
    err = 0.0
    for b in range(B):
        ids = indices[indptr[b]:indptr[b+1]].long()
        kvd = kv.double()
        for h in range(Hkv):
            if layout == "NHD":
                K = kvd[ids, 0, :, h].reshape(-1, D)[: lens[b]].double(); V = kvd[ids, 1, :, h].reshape(-1, D)[: lens[b]].double()
            else:
                K = kvd[ids, 0, h].reshape(-1, D)[: lens[b]].double(); V = kvd[ids, 1, h].reshape(-1, D)[: lens[b]].double()
            qq = q[b, h * G:(h + 1) * G].double()
            s = qq @ K.T / math.sqrt(D)
            ref = torch.softmax(s, 1) @ V
            err = max(err, (o[b, h * G:(h + 1) * G].double() - ref).abs().max().item())
            lse_ref = torch.logsumexp(s, 1) / math.log(2)
            err = max(err, (lse[b, h*G:(h+1)*G].double() - lse_ref).abs().max().item())
    ok_stats = bool((st.visited_pages == st.selected_pages).all()) and int(st.visited_tokens.sum()) == sum(lens) * Hkv
    print(f"B{B} Hkv{Hkv} G{G} D{D} P{P} {layout} chunk {chunk_pages}: hf {hf} work {w._plan.num_work} split {w._plan.split} err {err:.2e} stats {ok_stats} stable {int(st.stable_at.max())}")
    assert err < (1e-4 if DT == torch.float32 else 2e-2) and ok_stats, (err, ok_stats)
for DT in ((torch.float32, torch.bfloat16, torch.float16) if DEV == 'cuda' else (torch.float32,)):
  print(DT)
  check(3, 2, 7, 64, 16, "NHD")
  check(3, 2, 7, 64, 16, "HND")
  check(3, 2, 7, 64, 16, "NHD", chunk_pages=2)
  check(2, 8, 4, 128, 16, "NHD", chunk_pages=3)
  check(2, 4, 1, 32, 1, "HND", chunk_pages=5)
  check(2, 4, 2, 64, 8, "NHD")
  check(2, 3, 3, 64, 16, "NHD")
  check(3, 2, 7, 64, 16, "NHD", chunk_pages=8, lens=[700, 33, 1000])
  check(2, 8, 4, 128, 16, "HND", chunk_pages=4, lens=[300, 129])
  check(2, 4, 1, 32, 1, "NHD", chunk_pages=128, lens=[400, 77])
  check(4, 8, 4, 128, 16, "NHD", lens=[5000, 4097, 17, 3000])
  check(2, 2, 7, 64, 16, "NHD", lens=[9000, 16])
print("all fused checks passed")
