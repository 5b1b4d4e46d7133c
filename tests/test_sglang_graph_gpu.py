"""The SGLang backend's fixed-buffer decode plan, captured in a real CUDA graph (GPU only).

``StaticPlanBuffers`` + ``StaticPlanDecodeWrapper`` are what ``ARTAttnBackend`` replays under
SGLang's CUDA graphs. This captures one decode step for one batch, refills the buffers with
another batch's page table and queries, replays, and checks the result against an eager
``BatchARTDecodeWrapper`` on the second batch, in every termination mode. It needs no SGLang
install (the plan and wrapper are ours), so it runs on GPU machines where SGLang cannot.
"""

import pytest
import torch

from art_runtime import BatchARTDecodeWrapper, PageMetadata, TerminationConfig
from art_runtime.integrations.sglang.graph_decode import StaticPlanDecodeWrapper
from art_runtime.integrations.sglang.paging import StaticPlanBuffers
from art_runtime.termination import MODES

PAGE, HQ, HKV, DIM, POOL_PAGES = 16, 8, 2, 64, 256


def page_table(lengths, gen):
    pages = [-(-n // PAGE) for n in lengths]
    chosen = torch.randperm(POOL_PAGES, generator=gen)[: sum(pages)]
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * PAGE for n, p in zip(lengths, pages)], dtype=torch.int32)
    return tuple(t.cuda() for t in (indptr, chosen.int(), last))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_fixed_buffer_plan_replays_a_new_batch_in_a_cuda_graph(mode):
    gen = torch.Generator().manual_seed(7)
    k_pool = torch.randn(POOL_PAGES, PAGE, HKV, DIM, generator=gen).to("cuda", torch.bfloat16)
    v_pool = torch.randn(POOL_PAGES, PAGE, HKV, DIM, generator=gen).to("cuda", torch.bfloat16)
    cache = (k_pool, v_pool)
    every_page = (torch.tensor([0, POOL_PAGES], dtype=torch.int32, device="cuda"),
                  torch.arange(POOL_PAGES, dtype=torch.int32, device="cuda"),
                  torch.tensor([PAGE], dtype=torch.int32, device="cuda"))
    meta = PageMetadata.from_cache(cache, *every_page)
    termination = TerminationConfig(mode=mode, relative_to="values", tau_mag=0.05, tau_dir=1e-3, eps=0.1)
    buffers = StaticPlanBuffers.allocate(max_batch=4, num_kv_heads=HKV, capacity=4 * HKV * 48, device="cuda")
    wrapper = StaticPlanDecodeWrapper(buffers, 4, HQ, DIM, PAGE, termination, DIM ** -0.5, POOL_PAGES)
    q = torch.randn(4, HQ, DIM, generator=gen).to("cuda", torch.bfloat16)
    out = torch.full((4, HQ, DIM), float("nan"), device="cuda", dtype=torch.bfloat16)

    buffers.fill(*page_table([300, 37, 177, 600], gen), PAGE)
    wrapper.bind(4)
    wrapper.run(q, cache, page_meta=meta, out=out)  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        wrapper.run(q, cache, page_meta=meta, out=out)

    second = page_table([520, 16, 250, 90], gen)
    buffers.fill(*second, PAGE)
    q.copy_(torch.randn(4, HQ, DIM, generator=gen).to("cuda", torch.bfloat16))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    replayed_visits = wrapper.last_stats.visited_pages.clone()

    eager = BatchARTDecodeWrapper(backend="triton")
    eager.plan(*second, HQ, HKV, DIM, PAGE, termination=termination, chunk_pages=1 << 30)
    expected = eager.run(q, cache, page_meta=meta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=0)
    assert torch.equal(replayed_visits, eager.last_stats.visited_pages)
