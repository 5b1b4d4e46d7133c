"""How fast can ONE decode program walk its pages? (issue 7 targets 3-4: a terminating work item is a
serial chain; the shipped kernel reads a 128-token block every 1.46 us alone whatever num_stages.)

A stripped copy of mode off's loop (same tile, dots, online softmax), head_dim 64, 7 q heads per kv
head (pad 16), page 16, 128-token blocks, random bf16 data, rows whole. Variants of how a block's page
ids reach its K/V loads:
  carried : ids of block t+1 loaded during block t (shipped mode off)
  inline  : ids loaded in the block's own iteration (the pipeliner sees an indirect load chain)
  pass    : ids of a pass of PB blocks loaded once, each block's picked out in registers (inner loop
            pipelined with no load feeding an address)
  contig  : no page table: the row's pages contiguous (the ideal address stream)
  hot     : every block reads the same page ids (L1/L2 hits: compute + loop floor)
Per block time = kernel time / blocks per program.
"""
import sys, json, torch, triton
import triton.language as tl

H_KV, G, GP, D, P, BP = 2, 7, 16, 64, 16, 8
BN = BP * P


@triton.jit
def _fold(q, m_i, l_i, acc, k_ptr, v_ptr, phys, head, stride_kp, stride_kt, stride_kh, qk_scale,
          P: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PV16: tl.constexpr = False):
    slot = tl.arange(0, BN) % P
    dims = tl.arange(0, D)
    off = phys[:, None] * stride_kp + slot[:, None] * stride_kt + head * stride_kh + dims[None, :]
    k = tl.load(k_ptr + off)
    v = tl.load(v_ptr + off)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV16:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32")
    return m_new, l_i, acc


@triton.jit
def chain_kernel(q_ptr, k_ptr, v_ptr, out_ptr, ids_ptr, pages_per_row, stride_kp, stride_kt, stride_kh, qk_scale,
                 H_KV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                 BP: tl.constexpr, BN: tl.constexpr, VARIANT: tl.constexpr, PB: tl.constexpr, PV16: tl.constexpr = False):
    row = tl.program_id(0)
    head = row % H_KV
    g = tl.arange(0, GP)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + (row * GP + g)[:, None] * D + dims[None, :])
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = row * pages_per_row
    n_page = tl.arange(0, BN) // P
    if VARIANT == 0:  # carried
        phys = tl.load(ids_ptr + base + n_page).to(tl.int64)
        for pos in range(0, pages_per_row, BP):
            nxt = tl.load(ids_ptr + base + tl.minimum(pos + BP, pages_per_row - BP) + n_page).to(tl.int64)
            m_i, l_i, acc = _fold(q, m_i, l_i, acc, k_ptr, v_ptr, phys, head, stride_kp, stride_kt, stride_kh,
                                  qk_scale, P, BN, D, PV16)
            phys = nxt
    elif VARIANT == 1:  # inline
        for pos in range(0, pages_per_row, BP):
            phys = tl.load(ids_ptr + base + pos + n_page).to(tl.int64)
            m_i, l_i, acc = _fold(q, m_i, l_i, acc, k_ptr, v_ptr, phys, head, stride_kp, stride_kt, stride_kh,
                                  qk_scale, P, BN, D)
    elif VARIANT == 2:  # pass
        j = tl.arange(0, PB)
        for pass_pos in range(0, pages_per_row, PB * BP):
            ids = tl.load(ids_ptr + base + pass_pos + j[:, None] * BP + n_page[None, :])
            for b in range(0, PB):
                phys = tl.sum(tl.where(j[:, None] == b, ids, 0), 0).to(tl.int64)
                m_i, l_i, acc = _fold(q, m_i, l_i, acc, k_ptr, v_ptr, phys, head, stride_kp, stride_kt,
                                      stride_kh, qk_scale, P, BN, D)
    elif VARIANT == 3:  # contig
        for pos in range(0, pages_per_row, BP):
            phys = ((row // H_KV) * pages_per_row + pos + n_page).to(tl.int64)
            m_i, l_i, acc = _fold(q, m_i, l_i, acc, k_ptr, v_ptr, phys, head, stride_kp, stride_kt, stride_kh,
                                  qk_scale, P, BN, D)
    else:  # hot
        phys = tl.load(ids_ptr + base + n_page).to(tl.int64)
        for pos in range(0, pages_per_row, BP):
            m_i, l_i, acc = _fold(q, m_i, l_i, acc, k_ptr, v_ptr, phys + (pos // 1000000), head, stride_kp,
                                  stride_kt, stride_kh, qk_scale, P, BN, D, PV16)
    tl.store(out_ptr + (row * GP + g)[:, None] * D + dims[None, :], acc / l_i[:, None])


def sweep2(out_path):
    """Per-block compute of mode off's loop: P.V precision, warps, tile (carried ids; hot = no DRAM)."""
    props = torch.cuda.get_device_properties(0)
    ppr = 2048
    torch.manual_seed(0)
    rows_max = 264
    batch = rows_max // H_KV
    n_pages = batch * ppr
    kv = torch.randn(n_pages, 2, P, H_KV, D, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, 0], kv[:, 1]
    ids = torch.randperm(n_pages, device="cuda").to(torch.int32).view(batch, ppr).repeat_interleave(H_KV, 0)
    ids = ids.contiguous().view(-1)
    q = torch.randn(rows_max, GP, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(rows_max, GP, D, device="cuda", dtype=torch.float32)
    results = []
    ref = {}
    for rows in (2, 132, 264):
        for variant, vname in ((0, "carried"), (4, "hot")):
            for bp in (8, 16):
                for warps in (4, 8):
                    for pv16 in (False, True):
                        for stages in (2, 3):
                            args = (q, k, v, out, ids, ppr, k.stride(0), k.stride(1), k.stride(2), 0.125 * 1.4427)
                            kw = dict(H_KV=H_KV, G=G, GP=GP, D=D, P=P, BP=bp, BN=bp * P, VARIANT=variant, PB=8,
                                      PV16=pv16, num_warps=warps, num_stages=stages)
                            try:
                                c = chain_kernel[(rows,)](*args, **kw)
                                torch.cuda.synchronize()
                            except Exception as e:  # noqa: BLE001
                                print(f"FAILED {rows} {vname} bp{bp} w{warps} pv16 {pv16} st{stages}: {str(e)[:200]}")
                                continue
                            for _ in range(3):
                                chain_kernel[(rows,)](*args, **kw)
                            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            t0.record()
                            for _ in range(10):
                                chain_kernel[(rows,)](*args, **kw)
                            t1.record()
                            torch.cuda.synchronize()
                            t = t0.elapsed_time(t1) / 10 * 1000
                            per = t / (ppr // 8) * 1000  # per 128 tokens
                            if rows == 264 and variant == 0:
                                o = out[:rows].clone()
                                if "base" not in ref:
                                    ref["base"] = o
                                err = (o - ref["base"]).abs().max().item()
                            else:
                                err = float("nan")
                            r = dict(rows=rows, variant=vname, block_tokens=bp * P, warps=warps, pv16=pv16,
                                     stages=stages, us=round(t, 1), ns_per_128=round(per, 1), regs=c.n_regs,
                                     shared=c.metadata.shared, diff_vs_first=err)
                            results.append(r)
                            print(f"rows {rows:3d} {vname:7s} tile{bp * P:3d} w{warps} pv{'16' if pv16 else '32'} st{stages}"
                                  f"  {t:8.1f} us  {per:7.1f} ns/128tok  regs {c.n_regs} smem {c.metadata.shared}"
                                  f"  diff {err:.2e}", flush=True)
    json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__, results=results),
              open(out_path, "w"), indent=1)


def main():
    out_path = sys.argv[1]
    props = torch.cuda.get_device_properties(0)
    pages_per_row = 2048
    results = []
    names = ["carried", "inline", "pass", "contig", "hot"]
    torch.manual_seed(0)
    max_rows = 264
    batch = max_rows // H_KV
    n_pages = batch * pages_per_row
    kv = torch.randn(n_pages, 2, P, H_KV, D, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, 0], kv[:, 1]
    perm = torch.randperm(n_pages, device="cuda").to(torch.int32)
    # row r (request r // H_KV) walks its request's pages in a random physical order
    ids_all = perm.view(batch, pages_per_row).repeat_interleave(H_KV, 0).contiguous().view(-1)
    q = torch.randn(max_rows, GP, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(max_rows, GP, D, device="cuda", dtype=torch.float32)
    outs = {}
    for rows in (2, 132, 264):
        for variant in range(5):
            for stages in (2, 3, 4, 5):
                for pb in ((4, 8) if variant == 2 else (8,)):
                    ids = ids_all
                    args = (q, k, v, out, ids, pages_per_row, k.stride(0), k.stride(1), k.stride(2), 0.125 * 1.4427)
                    kw = dict(H_KV=H_KV, G=G, GP=GP, D=D, P=P, BP=BP, BN=BN, VARIANT=variant, PB=pb,
                              num_warps=4, num_stages=stages)
                    try:
                        c = chain_kernel[(rows,)](*args, **kw)
                        torch.cuda.synchronize()
                    except Exception as e:  # noqa: BLE001 - a probe reports what fails
                        print(f"rows {rows} {names[variant]} st{stages} pb{pb}: FAILED {type(e).__name__}: {str(e)[:200]}")
                        continue
                    for _ in range(3):
                        chain_kernel[(rows,)](*args, **kw)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(10):
                        chain_kernel[(rows,)](*args, **kw)
                    end.record()
                    torch.cuda.synchronize()
                    t = start.elapsed_time(end) / 10 * 1000
                    per_block = t / (pages_per_row // BP) * 1000
                    r = dict(rows=rows, variant=names[variant], stages=stages, pass_blocks=pb, us=round(t, 1),
                             ns_per_block=round(per_block, 1), regs=c.n_regs, shared=c.metadata.shared,
                             gbps=round(rows * pages_per_row * P * D * 2 * 2 / t / 1e3, 1))
                    results.append(r)
                    if rows == 264 and stages == 3 and variant < 3 and pb == 8:
                        outs[variant] = out.clone()
                    print(f"rows {rows:3d} {names[variant]:8s} st{stages} pb{pb}  {t:8.1f} us  {per_block:7.1f} ns/block"
                          f"  {r['gbps']:7.1f} GB/s  regs {c.n_regs} smem {c.metadata.shared}", flush=True)
    for vi in (1, 2):  # same pages, same order: the outputs must agree with the shipped form's
        print(f"{names[vi]} vs carried: max abs diff {(outs[vi] - outs[0]).abs().max().item():.3e}")
    json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__, results=results),
              open(out_path, "w"), indent=1)




@triton.jit
def fused_heads_kernel(q_ptr, k_ptr, v_ptr, out_ptr, ids_ptr, pages_per_req, chunks, stride_kp, stride_kt, qk_scale,
                       H_KV: tl.constexpr, HF: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                       P: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PV16: tl.constexpr):
    """One program reads HF adjacent KV heads of a chunk of a request's pages: whole HF*D-wide token rows.
    q rows of head h sit in the columns of head h only (block-diagonal), so one dot gives every row its
    own head's logits and one P.V every row its own head's output (in its head's columns)."""
    pid = tl.program_id(0)
    req = pid // (chunks * (H_KV // HF))
    rest = pid % (chunks * (H_KV // HF))
    hgroup = rest // chunks
    chunk = rest % chunks
    W: tl.constexpr = HF * D
    r = tl.arange(0, GP)
    c = tl.arange(0, W)
    row_head = r // G
    q = tl.load(q_ptr + (req * H_KV * G + hgroup * HF * G + r)[:, None] * D + (c % D)[None, :],
                mask=(row_head[:, None] == (c // D)[None, :]) & (r < HF * G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, W], tl.float32)
    per_chunk = pages_per_req // chunks
    base = req * pages_per_req + chunk * per_chunk
    n_page = tl.arange(0, BN) // P
    slot = tl.arange(0, BN) % P
    phys = tl.load(ids_ptr + base + n_page).to(tl.int64)
    for pos in range(0, per_chunk, BP):
        nxt = tl.load(ids_ptr + base + tl.minimum(pos + BP, per_chunk - BP) + n_page).to(tl.int64)
        off = phys[:, None] * stride_kp + slot[:, None] * stride_kt + hgroup * W + c[None, :]
        k = tl.load(k_ptr + off)
        v = tl.load(v_ptr + off)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV16:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="tf32")
        m_i = m_new
        phys = nxt
    tl.store(out_ptr + (pid * GP + r)[:, None] * W + c[None, :], acc / l_i[:, None])


def sweep3(out_path):
    """Per-head programs (shipped form) against programs that read HF heads' whole token rows, full load."""
    props = torch.cuda.get_device_properties(0)
    results = []
    def timeit(fn):
        fn(); torch.cuda.synchronize()
        for _ in range(3):
            fn()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(10):
            fn()
        t1.record(); torch.cuda.synchronize()
        return t0.elapsed_time(t1) / 10 * 1000
    for (h_kv, g, d, batch, ppr) in ((2, 7, 64, 132, 2048), (2, 7, 64, 64, 2048), (8, 4, 128, 64, 2048), (8, 4, 128, 16, 2048)):
        torch.manual_seed(0)
        n_pages = batch * ppr
        kv = torch.randn(n_pages, 2, P, h_kv, d, device="cuda", dtype=torch.bfloat16)
        k, v = kv[:, 0], kv[:, 1]
        perm = torch.randperm(n_pages, device="cuda").to(torch.int32)
        gbytes = n_pages * P * h_kv * d * 2 * 2
        gp = 16
        bn_head = min(128, 16384 // d)
        for stages in (2, 3):
            for pv16 in (False, True):
                # per head: rows = batch * h_kv, each a whole request's pages, the page table of its request
                ids = perm.view(batch, ppr).repeat_interleave(h_kv, 0).contiguous().view(-1)
                q = torch.randn(batch * h_kv, gp, d, device="cuda", dtype=torch.bfloat16)
                out = torch.empty(batch * h_kv, gp, d, device="cuda", dtype=torch.float32)
                rows = batch * h_kv
                fn = lambda: chain_kernel[(rows,)](q, k, v, out, ids, ppr, k.stride(0), k.stride(1), k.stride(2), 0.18,
                                                   H_KV=h_kv, G=g, GP=gp, D=d, P=P, BP=bn_head // P, BN=bn_head,
                                                   VARIANT=0, PB=8, PV16=pv16, num_warps=4, num_stages=stages)
                t = timeit(fn)
                line = dict(shape=f"{h_kv * g}/{h_kv}/{d}", batch=batch, form="per-head", hf=1, chunks=1, stages=stages,
                            pv16=pv16, programs=rows, us=round(t, 1), tbps=round(gbytes / t / 1e6, 3))
                results.append(line); print(line, flush=True)
                for hf in ((2,) if h_kv == 2 else (2, 4)):
                    w = hf * d
                    bn = min(128, 16384 // w)
                    if bn < 16:
                        continue
                    qf = torch.randn(batch, h_kv * g, d, device="cuda", dtype=torch.bfloat16)
                    for chunks in (1, 2, 4):
                        progs = batch * (h_kv // hf) * chunks
                        outf = torch.empty(progs, gp, w, device="cuda", dtype=torch.float32)
                        fn = lambda: fused_heads_kernel[(progs,)](qf, k, v, outf, perm, ppr, chunks, k.stride(0), k.stride(1),
                                                                  0.18, H_KV=h_kv, HF=hf, G=g, GP=gp, D=d, P=P,
                                                                  BP=bn // P, BN=bn, PV16=pv16, num_warps=4,
                                                                  num_stages=stages)
                        try:
                            t = timeit(fn)
                        except Exception as e:  # noqa: BLE001
                            print("FAILED", hf, chunks, str(e)[:300]); continue
                        line = dict(shape=f"{h_kv * g}/{h_kv}/{d}", batch=batch, form="fused", hf=hf, chunks=chunks,
                                    stages=stages, pv16=pv16, programs=progs, us=round(t, 1),
                                    tbps=round(gbytes / t / 1e6, 3))
                        results.append(line); print(line, flush=True)
    json.dump(dict(device=props.name, torch=torch.__version__, triton=triton.__version__, results=results),
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "compute":
        sweep2(sys.argv[1])
    elif len(sys.argv) > 2 and sys.argv[2] == "fused":
        sweep3(sys.argv[1])
    else:
        main()
