"""The SGLang backend's fixed-buffer decode plan, captured in a real CUDA graph (GPU), with every policy.

``StaticPlanBuffers`` + ``StaticPlanDecodeWrapper`` are what ``ARTAttnBackend`` runs, eager
and under SGLang's CUDA graphs. This prepares one batch, captures one decode step (for
query-dependent policies the capture holds the page scoring and the selection kernel too),
prepares another batch with other lengths and queries in the same buffers, replays, and checks
the result bit for bit against an eager ``BatchARTDecodeWrapper.plan(policy=...)`` on the
second batch, for every policy the SGLang hook accepts and every termination mode. It needs
no SGLang install (the plan and wrapper are ours), so it runs on GPU machines where SGLang
cannot. The CPU test runs the same steps without the capture, under the Triton interpreter,
so that the GPU test's logic is checked on every CI run.
"""

import pytest
import torch

from art_runtime import BatchARTDecodeWrapper, PageMetadata, TerminationConfig
from art_runtime.backend import triton_runs_on
from art_runtime.integrations.sglang.graph_decode import StaticPlanDecodeWrapper
from art_runtime.integrations.sglang.page_state import paged_policy
from art_runtime.integrations.sglang.paging import StaticPlanBuffers
from art_runtime.policies import get as get_policy
from art_runtime.termination import MODES

PAGE, HQ, HKV, DIM, POOL_PAGES, MAX_BATCH, WIDTH = 16, 8, 2, 64, 256, 4, 48
POLICIES = {
    "none": lambda: None,
    "dense-quest": lambda: get_policy("dense", order="quest"),
    "dense-mass": lambda: get_policy("dense", order="mass"),
    "quest": lambda: get_policy("quest", budget=6),
    "streaming_llm": lambda: get_policy("streaming_llm", sink_pages=1, window_pages=5),
    "snapkv": lambda: get_policy("snapkv", budget=6, window=8),
    "h2o": lambda: get_policy("h2o", budget=6, recent_pages=2),
}
PROMPT_SHORTER_BY = 5  # SnapKV: the prompt ends this many tokens before the batch's length


def page_table(lengths, gen, device):
    pages = [-(-n // PAGE) for n in lengths]
    chosen = torch.randperm(POOL_PAGES, generator=gen)[: sum(pages)]
    indptr = torch.tensor([0, *torch.tensor(pages).cumsum(0).tolist()], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * PAGE for n, p in zip(lengths, pages)], dtype=torch.int32)
    return tuple(t.to(device) for t in (indptr, chosen.int(), last))


def replay_a_new_batch(policy_name, mode, device, dtype, capture, backend="triton", block_pages=None):
    """Prepare batch 1, capture (or just run) a step, prepare batch 2, replay (or run); compare to eager.

    Returns the fixed plan of batch 2. Where it cuts rows into chunks (modes off and stability
    on a GPU, a small batch of long rows), the eager plan is cut into chunks of the same length.
    """
    gen = torch.Generator().manual_seed(7)
    k_pool = torch.randn(POOL_PAGES, PAGE, HKV, DIM, generator=gen).to(device, dtype)
    v_pool = torch.randn(POOL_PAGES, PAGE, HKV, DIM, generator=gen).to(device, dtype)
    cache = (k_pool, v_pool)
    every_page = (torch.tensor([0, POOL_PAGES], dtype=torch.int32, device=device),
                  torch.arange(POOL_PAGES, dtype=torch.int32, device=device),
                  torch.tensor([PAGE], dtype=torch.int32, device=device))
    meta = PageMetadata.from_cache(cache, *every_page)
    termination = TerminationConfig(mode=mode, relative_to="values", tau_mag=0.05, tau_dir=1e-3, eps=0.1,
                                    block_pages=block_pages)
    library = POLICIES[policy_name]()  # keyed by request id: the eager reference's
    policy = paged_policy(POLICIES[policy_name](), 1, POOL_PAGES, HKV, device)  # keyed by page: the fixed plan's
    kept = WIDTH if policy is None or policy.name == "dense" else 6
    buffers = StaticPlanBuffers.allocate(MAX_BATCH, HKV, WIDTH, kept, device)
    wrapper = StaticPlanDecodeWrapper(buffers, MAX_BATCH, HQ, DIM, PAGE, termination, DIM ** -0.5, POOL_PAGES,
                                      policy=policy, backend=backend)
    q = torch.randn(MAX_BATCH, HQ, DIM, generator=gen).to(device, dtype)
    out = torch.full((MAX_BATCH, HQ, DIM), float("nan"), device=device, dtype=dtype)

    wrapper.prepare(*page_table([300, 37, 177, 600], gen, device))
    wrapper.run(q, cache, page_meta=meta, out=out)  # compile and warm up outside the capture
    if capture:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            wrapper.run(q, cache, page_meta=meta, out=out)

    second = page_table([520, 16, 250, 90], gen, device)
    if policy_name == "h2o":  # the run before the capture observed its pages: start clean, as the library does
        policy.mass.zero_()
        policy.evicted.zero_()
    if policy_name == "snapkv":
        prefill_votes(policy, library, second, k_pool, gen)
    wrapper.prepare(*second)
    q.copy_(torch.randn(MAX_BATCH, HQ, DIM, generator=gen).to(device, dtype))
    out.fill_(float("nan"))
    if capture:
        graph.replay()
        torch.cuda.synchronize()
    else:
        wrapper.run(q, cache, page_meta=meta, out=out)
    stats = wrapper.last_stats

    fixed = wrapper._plan
    chunk_pages = int((fixed.work_end - fixed.work_start).max()) if fixed.split else 1 << 30
    eager = BatchARTDecodeWrapper(backend=backend)
    eager.plan(*second, HQ, HKV, DIM, PAGE, termination=termination, chunk_pages=chunk_pages, policy=library,
               request_ids=None if library is None or not library.stateful else list(range(MAX_BATCH)))
    expected = eager.run(q, cache, page_meta=meta)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), rtol=0, atol=0)
    reference = eager.last_stats
    assert torch.equal(stats.visited_pages, reference.visited_pages)
    assert torch.equal(stats.selected_pages, reference.selected_pages)
    nnz = int(reference.selection.indptr[-1])
    assert torch.equal(stats.selection.pages[:nnz], reference.selection.pages[:nnz])
    if policy_name == "h2o":  # the mass observed inside the graph, per page, equals the library's per request
        indptr, indices, _ = (t.cpu() for t in second)
        for r in range(MAX_BATCH):
            mass, evicted = library.request_state(r, 0)
            pages = indices[indptr[r]: indptr[r + 1]].long()
            torch.testing.assert_close(policy.mass[0, pages].T.cpu(), mass.cpu(), rtol=1e-5, atol=1e-6)
            assert torch.equal(policy.evicted[0, pages].T.cpu(), evicted.cpu())
        assert bool((policy.mass > 0).any())
    return fixed


def prefill_votes(policy, library, table, k_pool, gen):
    """SnapKV's prefill of every request of ``table``: the same prompt votes, per page and per request id."""
    indptr, indices, last = (t.cpu() for t in table)
    for r in range(MAX_BATCH):
        pages = indices[indptr[r]: indptr[r + 1]].to(k_pool.device)
        prompt = int((len(pages) - 1) * PAGE + last[r]) - PROMPT_SHORTER_BY
        keys = k_pool[pages.long()].reshape(-1, HKV, DIM)[:prompt]
        queries = torch.randn(prompt, HQ, DIM, generator=gen).to(keys)
        library.prefill(r, 0, queries, keys, PAGE)
        policy.vote(0, queries[-policy.window:], keys, pages[: -(-prompt // PAGE)], PAGE, DIM ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_fixed_buffer_plan_replays_a_new_batch_in_a_cuda_graph(policy_name, mode):
    replay_a_new_batch(policy_name, mode, "cuda", torch.bfloat16, capture=True)


interpreted = pytest.mark.skipif(not triton_runs_on(torch.device("cpu")),
                                 reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (conftest sets it without a GPU)")


@interpreted
@pytest.mark.parametrize("mode", ["bound", "mass"])  # the modes with a pre-pass
@pytest.mark.parametrize("policy_name", POLICIES)
def test_the_graph_test_steps_run_on_cpu(policy_name, mode):
    """The GPU test's steps without the capture, float32 under the Triton interpreter."""
    replay_a_new_batch(policy_name, mode, "cpu", torch.float32, capture=False)


@pytest.mark.parametrize("policy_name", ["quest", "h2o"])
def test_the_fixed_plan_on_the_torch_backend(policy_name):
    """The torch backend (a CPU server without the Triton interpreter) reads the fixed buffers alike."""
    replay_a_new_batch(policy_name, "bound", "cpu", torch.float32, capture=False, backend="torch")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=interpreted), "torch"])
@pytest.mark.parametrize("mode", ["off", "stability"])
def test_the_fixed_plan_cuts_a_small_batchs_rows_into_chunks(mode, backend, monkeypatch):
    """Modes off and stability on a device of 64 program slots: the fixed plan cuts the rows
    (2-38 pages, 1-page blocks) into as many chunks as the eager plan would cut the longest row
    the buffers hold; the shorter rows' last chunks are empty, and the result equals the eager
    plan cut into chunks of the same length, bit for bit."""
    monkeypatch.setattr(BatchARTDecodeWrapper, "_parallel_programs",
                        staticmethod(lambda device, termination, row_width: 64))
    fixed = replay_a_new_batch("none", mode, "cpu", torch.float32, capture=False, backend=backend, block_pages=1)
    chunks = fixed.num_work // fixed.num_rows
    assert chunks > 1
    lengths = (fixed.work_end - fixed.work_start).view(fixed.num_rows, chunks)
    assert bool((lengths == 0).any())  # a short row's chunks past its end
    assert torch.equal(lengths.sum(1), (fixed.row_start[1:] - fixed.row_start[:-1]).long())


@interpreted
def test_a_fixed_plan_cuts_small_batches_that_its_largest_does_not(monkeypatch):
    """Buffers for 16 requests on 16 program slots: 32 rows run whole, a batch of 2 is cut into
    chunks, and the chunks' partial outputs have room though the largest batch needs none."""
    monkeypatch.setattr(BatchARTDecodeWrapper, "_parallel_programs",
                        staticmethod(lambda device, termination, row_width: 16))
    gen = torch.Generator().manual_seed(3)
    cache = tuple(torch.randn(POOL_PAGES, PAGE, HKV, DIM, generator=gen) for _ in range(2))
    termination = TerminationConfig(mode="off", block_pages=1)
    wrapper = StaticPlanDecodeWrapper(StaticPlanBuffers.allocate(16, HKV, WIDTH, WIDTH, "cpu"), 16, HQ, DIM, PAGE,
                                      termination, DIM ** -0.5, POOL_PAGES)
    assert wrapper._chunks[16] == 1 and wrapper._chunks[2] > 1
    table = page_table([700, 90], gen, "cpu")
    wrapper.prepare(*table)
    q = torch.randn(2, HQ, DIM, generator=gen)
    out = wrapper.run(q, cache)
    assert wrapper._plan.split
    eager = BatchARTDecodeWrapper(backend="triton")
    eager.plan(*table, HQ, HKV, DIM, PAGE, termination=termination,
               chunk_pages=int((wrapper._plan.work_end - wrapper._plan.work_start).max()))
    torch.testing.assert_close(out, eager.run(q, cache), rtol=0, atol=0)


@interpreted
def test_the_graph_test_steps_run_on_cpu_with_the_selection_kernel(monkeypatch):
    """As on a GPU, the pages are ordered by the Triton selection kernel (interpreted here)."""
    from art_runtime import selection

    order_pages = selection.order_pages
    calls = []

    def kernel_order_pages(*args, **kwargs):
        calls.append(1)
        return order_pages(*args, **kwargs, kernel=True)

    monkeypatch.setattr(selection, "order_pages", kernel_order_pages)
    replay_a_new_batch("quest", "stability", "cpu", torch.float32, capture=False)
    assert len(calls) == 3  # the two runs of the fixed plan and the eager run
