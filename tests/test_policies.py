"""Page-selection policies: each equals a brute-force reference; every registered policy runs
through the kernel in every termination mode; bad arguments raise ValueError."""

import math

import pytest
import torch

from art_runtime import BatchARTDecodeWrapper, PageSelection, TerminationConfig
from art_runtime.termination import MODES
from art_runtime.page_metadata import key_box_scale, quantize_key_box
from art_runtime.paged_cache import gather_request_kv
from art_runtime.policies import REGISTRY, DensePolicy, H2OPolicy, PolicyContext, QuestPolicy, StreamingLLMPolicy, get
from attention_cases import exact_attention, make_case, relative_error

SEQ_LENS = [300, 17, 161]  # 19, 2 and 11 pages of 16


def context(case, request_ids=None):
    return PolicyContext(case.kv_indptr, case.kv_indices, case.kv_last_page_len, case.num_qo_heads,
                         case.num_kv_heads, case.page_size, request_ids)


def select(policy, case, layer_id=0, request_ids=None):
    ctx = context(case, request_ids)
    layout = policy.layout(ctx)
    pages = policy.select(ctx, layout, layer_id, case.q, case.page_meta())
    return [pages[layout.indptr[r]:layout.indptr[r + 1]].tolist() for r in range(ctx.num_rows)]


def forced_then(rest_in_order, n):
    """Sink, current page, then the others in the given order (without repeating those two)."""
    head = [0] if n == 1 else [0, n - 1]
    return head + [p for p in rest_in_order if p not in head]


def quest_bound(case, b, h, p):
    """float64 max over the group of sum_d max(q kmax, q kmin), the box of page p's real keys
    rounded outward to fp8 as ``PageMetadata`` stores it (brute-force checked there)."""
    k, _ = gather_request_kv(case.cache, case.kv_indptr, case.kv_indices, case.kv_last_page_len, b)
    keys = k[p * case.page_size:(p + 1) * case.page_size, h].double()
    group = case.num_qo_heads // case.num_kv_heads
    q = case.q[b, h * group:(h + 1) * group].double()
    lo, hi = keys.amin(0).float(), keys.amax(0).float()
    scale = key_box_scale(torch.maximum(lo.abs(), hi.abs()).amax())
    kmin, kmax = (box.double() * scale.double() for box in quantize_key_box(lo, hi, scale))
    return float(torch.maximum(q * kmax, q * kmin).sum(-1).max())


@pytest.fixture
def case(device):
    return make_case(SEQ_LENS, 8, 2, 64, 16, device=device, seed=3)


def test_dense_recency_reference(case):
    got = select(DensePolicy(order="recency"), case)
    for b, n in enumerate(case.pages_per_request()):
        for h in range(2):
            assert got[b * 2 + h] == forced_then(list(range(n - 1, 0, -1)), n)


@pytest.mark.parametrize("policy", [DensePolicy(order="quest"), QuestPolicy(budget=5), QuestPolicy(token_budget=70)],
                         ids=["dense-quest", "quest-5", "quest-70-tokens"])
def test_quest_scoring_reference(policy, case):
    got = select(policy, case)
    for b, n in enumerate(case.pages_per_request()):
        for h in range(2):
            bounds = {p: quest_bound(case, b, h, p) for p in range(n)}
            order = forced_then(sorted(range(n), key=lambda p: -bounds[p]), n)
            budget = n if isinstance(policy, DensePolicy) else (policy.budget or math.ceil(70 / 16))
            assert got[b * 2 + h] == order[:min(budget, n)]


@pytest.mark.parametrize("budget", [2, 7, 1000])
def test_selection_kernel_equals_torch_ordering(budget, device):
    """The Triton selection kernel and the torch sort give the same visit order, ties included."""
    from art_runtime import selection

    case = make_case([300, 5, 161, 33], 8, 2, 64, 16, device=device, seed=5)  # 19, 1, 11 and 3 pages
    ctx = context(case)
    policy = QuestPolicy(budget=budget)
    layout = policy.layout(ctx)
    assert layout.keeps_all == (budget == 1000)  # the kernel then sorts whole rows, with no kept-th page to find
    gen = torch.Generator().manual_seed(budget)
    scores = torch.randint(-3, 4, (ctx.num_rows, layout.width), generator=gen).float().to(case.q.device)  # many ties
    scores[0, 3] = float("inf")  # a score equal to the sink's still comes after the sink and the current page
    kernel = selection.order_pages(scores, ctx, layout, kernel=True)
    reference = selection.order_pages(scores, ctx, layout, kernel=False)
    assert torch.equal(kernel, reference)
    for r in range(ctx.num_rows):  # and both are what the order means, by brute force
        n = case.pages_per_request()[r // 2]
        rest = sorted(range(n), key=lambda p: (-min(float(scores[r, p]), 3e38), p))
        row = kernel[layout.indptr[r]:layout.indptr[r + 1]].tolist()
        assert row == forced_then(rest, n)[:min(budget, n)]


def test_dense_order_ties_scores_its_32_bit_keys_cannot_tell_apart(device):
    """A row that keeps every page sorts on 32-bit keys: scores within the dropped low bits of
    their order keys (here 5: rows of up to 32 pages) go in position order, the rest by score;
    kernel and torch alike."""
    from art_runtime import selection

    case = make_case([300, 5, 161, 33], 8, 2, 64, 16, device=device, seed=6)  # 19, 1, 11 and 3 pages
    ctx = context(case)
    layout = QuestPolicy(budget=1000).layout(ctx)
    assert layout.keeps_all and selection.dense_keys_fit_32_bits(True, 32)
    positions = torch.arange(layout.width)
    # Even pages: 1 + 0 / 1 / 2 ulps (one key bucket; exact order would put p % 3 == 2 first);
    # odd pages: well apart, the later the higher.
    near = 1.0 + (positions % 3).double() * 2.0 ** -23
    scores = torch.where(positions % 2 == 0, near, 2.0 + positions.double()).float()
    scores = scores.expand(ctx.num_rows, -1).contiguous().to(case.q.device)
    kernel = selection.order_pages(scores, ctx, layout, kernel=True)
    reference = selection.order_pages(scores, ctx, layout, kernel=False)
    assert torch.equal(kernel, reference)
    for r in range(ctx.num_rows):
        n = case.pages_per_request()[r // 2]
        rest = [p for p in range(n - 1, -1, -1) if p % 2] + [p for p in range(n) if p % 2 == 0]
        assert kernel[layout.indptr[r]:layout.indptr[r + 1]].tolist() == forced_then(rest, n)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("slotted", [False, True], ids=["in-order", "slotted"])
def test_selection_writes_a_plans_visit_buffers(kernel, slotted, device):
    """With ``out`` the selection also writes each entry's physical page and token count (each
    row's k-th entry at ``out.slot[k]`` if given), and leaves the buffers' padding (entries past
    the layout) as it was."""
    from art_runtime import selection

    case = make_case([300, 5, 161, 33], 8, 2, 64, 16, device=device, seed=9)
    ctx = context(case)
    layout = QuestPolicy(budget=6).layout(ctx)
    nnz = layout.row.numel()
    gen = torch.Generator().manual_seed(9)
    scores = torch.randn(ctx.num_rows, layout.width, generator=gen).to(case.q.device)
    slot = None
    if slotted:  # a random permutation within each row, padded like the buffers
        start = layout.indptr[:-1].long().cpu()[layout.row.cpu()]
        shuffled = torch.cat([torch.randperm(int(n), generator=gen) for n in layout.indptr.diff().cpu()])
        slot = torch.cat([start + shuffled, torch.full((5,), -1)]).to(torch.int32).to(case.q.device)
    out = selection.VisitBuffers(*(torch.full((nnz + 5,), -7, dtype=torch.int32, device=case.q.device)
                                   for _ in range(3)), slot=slot)
    pages = selection.order_pages(scores, ctx, layout, kernel=kernel, out=out)
    assert pages is out.pages
    in_order = selection.order_pages(scores, ctx, layout, kernel=False)
    if slotted:
        assert torch.equal(out.pages[slot[:nnz].long()], in_order)
    else:
        assert torch.equal(out.pages[:nnz], in_order)
    assert (out.pages[nnz:] == -7).all() and (out.phys[nnz:] == -7).all() and (out.tokens[nnz:] == -7).all()
    request = (layout.row // ctx.num_kv_heads).cpu()
    indptr, indices, last = (t.cpu().long() for t in (ctx.kv_indptr, ctx.kv_indices, ctx.kv_last_page_len))
    logical = out.pages[:nnz].cpu().long()
    assert torch.equal(out.phys[:nnz].cpu().long(), indices[indptr[request] + logical])
    is_last = logical == indptr[request + 1] - indptr[request] - 1
    assert torch.equal(out.tokens[:nnz].cpu().long(), torch.where(is_last, last[request], ctx.page_size))
    with pytest.raises(ValueError, match="out"):
        selection.order_pages(scores, ctx, layout, kernel=kernel,
                              out=selection.VisitBuffers(out.pages[:nnz - 1], out.phys, out.tokens))


@pytest.mark.parametrize("kind, budget", [("spread", 7), ("ties", 7), ("ties", 600), ("equal", 1000),
                                          ("normal", 100), ("outlier", 100), ("infinite", 100)],
                         ids=["spread", "ties-by-position", "ties-large-budget", "all-equal-dense", "normal",
                              "outlier-key-rounds", "infinite-key-rounds"])
def test_selection_kernel_wide_rows(kind, budget, device):
    """Rows of 1000 pages: spread integer scores and continuous scores, where the kernel's one
    round over 256 value bins leaves an edge of a few pages, ranked pairwise; many ties (an
    edge of equal keys, taken in position order), a large budget, all scores equal (a keep-all
    row); one outlier per row, or -inf and +inf scores, which crowd one value bin (or make the
    span infinite), so that the kernel narrows the edge by rounds over the order keys."""
    from art_runtime import selection

    case = make_case([16 * 1000 - 3, 16 * 900], 4, 2, 16, 16, device=device, seed=len(kind))
    ctx = context(case)
    layout = QuestPolicy(budget=budget).layout(ctx)
    gen = torch.Generator().manual_seed(budget)
    shape = (ctx.num_rows, layout.width)
    if kind in ("spread", "ties", "equal"):
        scores = torch.randint(0, {"spread": 1000, "ties": 2, "equal": 1}[kind], shape, generator=gen).float()
    else:
        scores = torch.randn(shape, generator=gen)
        if kind == "outlier":
            scores[:, 500] = 1e30
        if kind == "infinite":
            scores[:, 7::50] = float("-inf")
            scores[1, 9] = float("inf")
    scores = scores.to(case.q.device)
    kernel = selection.order_pages(scores, ctx, layout, kernel=True)
    assert torch.equal(kernel, selection.order_pages(scores, ctx, layout, kernel=False))


def test_key_box_kernel_scores_equal_torch_scores(case):
    from art_runtime.page_scores import _key_box_scores_torch, estimated_page_log_mass, quest_page_scores

    ctx, meta = context(case), case.page_meta()
    for reduce in ("max", "mean"):
        kernel = quest_page_scores(ctx, case.q, meta, 19, reduce)
        reference = _key_box_scores_torch(ctx, case.q, meta, 19, reduce)
        assert torch.allclose(kernel, reference, rtol=1e-5, atol=1e-4)
    kernel = estimated_page_log_mass(ctx, case.q, meta, 19, 0.125)
    reference = _key_box_scores_torch(ctx, case.q, meta, 19, "mass", 0.125)
    assert torch.allclose(kernel, reference, rtol=1e-5, atol=1e-4)


def test_mass_order_reference(case):
    """Dense mass order: sink, current, then by the group's estimated log-mass, brute force in float64."""
    got = select(DensePolicy(order="mass"), case)
    meta = case.page_meta()
    for b, n in enumerate(case.pages_per_request()):
        phys = case.kv_indices[case.kv_indptr[b]:case.kv_indptr[b + 1]].long()
        for h in range(2):
            lo, hi = (x.double() for x in meta.key_bounds(phys, h))  # [n, D]
            q = case.q[b, h * 4:(h + 1) * 4].double()
            log_mass = (q @ ((lo + hi) / 2).T) / 8 + (q.square() @ ((hi - lo) / 4).square().T) / 128  # s = 1/8
            score = torch.logsumexp(log_mass, 0)
            assert got[b * 2 + h] == forced_then(sorted(range(n), key=lambda p: -float(score[p])), n)


@pytest.mark.parametrize("mode, order", [("stability", "quest"), ("mass", "mass")])
def test_dense_auto_order_follows_the_termination_mode(case, mode, order):
    """``DensePolicy()`` (order ``auto``) visits in Quest order under stability and in the mass
    order otherwise: the pages the wrapper walked are the concrete order's selection."""
    wrapper = BatchARTDecodeWrapper(backend="torch")
    wrapper.plan(*case.plan_args(), termination=TerminationConfig(mode=mode, eps=1e-9, tau_mag=0.0, tau_dir=0.0),
                 policy=DensePolicy())
    wrapper.run(case.q, case.cache, page_meta=case.page_meta())
    visited = wrapper.last_stats.selection
    got = [visited.pages[visited.indptr[r]:visited.indptr[r + 1]].tolist() for r in range(visited.indptr.numel() - 1)]
    assert got == select(DensePolicy(order=order), case)
    assert select(DensePolicy(order="quest"), case) != select(DensePolicy(order="mass"), case)  # the case tells them apart


def test_streaming_llm_reference(case):
    got = select(StreamingLLMPolicy(sink_pages=2, window_pages=4), case)
    for b, n in enumerate(case.pages_per_request()):
        window = list(range(n - 1, max(n - 4, 0) - 1, -1))
        sinks = [p for p in (0, 1) if p < n]
        expected = forced_then(sinks + [p for p in window if p not in sinks], n)
        for h in range(2):
            assert got[b * 2 + h] == expected[:6]


def test_h2o_keeps_heavy_pages_and_evicts_for_good(case):
    policy = H2OPolicy(budget=6, recent_pages=2)
    ids = ["a", "b", "c"]
    first = select(policy, case, request_ids=ids)
    for b, n in enumerate(case.pages_per_request()):  # no history: sink, recent, then newest
        assert first[b * 2] == forced_then(list(range(n - 1, 0, -1)), n)[:6]
    wrapper = BatchARTDecodeWrapper(backend="torch")
    wrapper.plan(*case.plan_args(), termination=TerminationConfig(mode="off"), policy=policy, request_ids=ids)
    wrapper.run(case.q, case.cache)
    stats = wrapper.last_stats
    mass = stats.page_mass
    pages = stats.selection.pages
    # Heavy hitters after one step: the pages of the first selection by mass (recent forced).
    state_mass, evicted = policy.request_state("a", 0)
    row0 = pages[:6].long()
    assert torch.allclose(state_mass[0, row0], mass[:6])
    assert evicted[0].sum() == case.pages_per_request()[0] - 6  # every unselected page is gone
    second = select(policy, case, request_ids=ids)
    n = case.pages_per_request()[0]
    candidates = sorted((p for p in first[0] if p not in (0, n - 1, n - 2)), key=lambda p: -float(state_mass[0, p]))
    assert second[0] == [0, n - 1, n - 2] + candidates[:3]
    policy.release("a")
    with pytest.raises(ValueError, match="request_id"):
        policy.request_state("a", 0)


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "triton"])
def test_h2o_state_over_steps_with_requests_leaving_joining_and_growing(kernel, device):
    """Slot-batched H2O state (its Triton kernels and its torch path) against a per-request
    brute force over steps in which a request ends (its slot is taken by a new one, which must
    start clean) and a request outgrows the state's capacity."""
    from art_runtime.policies.h2o import h2o_page_scores
    from art_runtime.selection import order_pages

    heads, recent, budget = 2, 2, 6
    policy = H2OPolicy(budget=budget, recent_pages=recent)
    gen = torch.Generator().manual_seed(11)
    reference = {}  # request_id -> (mass [H, pages] float64, evicted [H, pages] bool)
    steps = [(["a", "b", "c"], [19, 2, 11]), (["c", "a"], [12, 19]), (["d", "a", "c"], [3, 40, 12])]
    for step, (ids, pages) in enumerate(steps):
        if step == 1:
            policy.release("b")
        indptr = torch.tensor([0] + pages).cumsum(0).to(torch.int32)
        ctx = PolicyContext(indptr.to(device), torch.randperm(sum(pages), generator=gen).to(device, torch.int32),
                            torch.full((len(ids),), 16, dtype=torch.int32, device=device), 4, heads, 16, ids)
        layout = policy.layout(ctx)
        got = order_pages(policy.page_scores(ctx, 0, None, None, layout.width, kernel=kernel), ctx, layout).cpu()
        for b, (request_id, n) in enumerate(zip(ids, pages)):
            mass, evicted = reference.get(request_id, (torch.zeros(heads, 0, dtype=torch.float64),
                                                       torch.zeros(heads, 0, dtype=torch.bool)))
            grow = n - mass.shape[1]
            mass = torch.cat([mass, torch.zeros(heads, grow, dtype=torch.float64)], 1)
            evicted = torch.cat([evicted, torch.zeros(heads, grow, dtype=torch.bool)], 1)
            reference[request_id] = (mass, evicted)
            scores = h2o_page_scores(mass.float(), evicted, torch.arange(n), torch.tensor(n), recent)
            for h in range(heads):
                row = b * heads + h
                order = forced_then(sorted(range(n), key=lambda p: (-float(scores[h, p]), p)), n)[:budget]
                assert got[layout.indptr[row]:layout.indptr[row + 1]].tolist() == order, (step, request_id, h)
        page_mass = torch.rand(got.numel(), generator=gen)
        policy.observe(ctx, layout, 0, got.to(device, torch.int32), page_mass.to(device), kernel=kernel)
        for b, (request_id, n) in enumerate(zip(ids, pages)):
            mass, evicted = reference[request_id]
            for h in range(heads):
                row = b * heads + h
                chosen = got[layout.indptr[row]:layout.indptr[row + 1]].long()
                mass[h, chosen] += page_mass[layout.indptr[row]:layout.indptr[row + 1]].double()
                evicted[h] |= ~torch.zeros(n, dtype=torch.bool).index_fill_(0, chosen, True)
            state_mass, state_evicted = policy.request_state(request_id, 0)
            torch.testing.assert_close(state_mass.cpu().double(), mass, rtol=1e-6, atol=1e-7)
            assert torch.equal(state_evicted.cpu(), evicted)
    assert policy.request_state("d", 0)[0].shape == (heads, 3)


def test_h2o_kernels_on_state_kept_per_physical_page_match_torch(case):
    """SGLang's H2O (state per physical page): its Triton path (``PAGED``) against its torch path."""
    from art_runtime.integrations.sglang.page_state import paged_policy
    from art_runtime.policies.h2o import launch_h2o_observe, launch_h2o_scores
    from art_runtime.selection import order_pages

    device = case.q.device
    pool = int(case.kv_indices.max()) + 1
    policy = paged_policy(H2OPolicy(budget=6, recent_pages=2), 1, pool, case.num_kv_heads, "cpu")
    gen = torch.Generator().manual_seed(12)
    policy.mass.copy_(torch.rand(policy.mass.shape, generator=gen))
    policy.evicted.copy_(torch.rand(policy.evicted.shape, generator=gen) < 0.3)
    ctx = context(case)
    layout = policy.layout(ctx)
    cpu_ctx = PolicyContext(*(t.cpu() for t in (case.kv_indptr, case.kv_indices, case.kv_last_page_len)),
                            case.num_qo_heads, case.num_kv_heads, case.page_size)
    expected = policy.page_scores(cpu_ctx, 0, None, None, layout.width)  # torch: the state is on the CPU
    got = launch_h2o_scores(ctx, policy.mass[0].to(device), policy.evicted[0].to(device), None, layout.width,
                            policy.recent_pages).cpu()
    valid = cpu_ctx.page_positions(layout.width) >= 0
    assert torch.equal(got[valid], expected[valid]) and bool((got[~valid] == float("-inf")).all())

    pages = order_pages(got.to(device), ctx, layout)
    page_mass = torch.rand(pages.numel(), generator=gen)
    mass, evicted = policy.mass[0].to(device), policy.evicted[0].to(device)
    launch_h2o_observe(ctx, layout, mass, evicted, None, pages, page_mass.to(device))
    cpu_layout = type(layout)(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in
                                (layout.indptr, layout.row, layout.rank, layout.width, layout.kept)))
    policy.observe(cpu_ctx, cpu_layout, 0, pages.cpu(), page_mass)
    torch.testing.assert_close(mass.cpu(), policy.mass[0], rtol=0, atol=0)
    assert torch.equal(evicted.cpu(), policy.evicted[0])


def test_h2o_rejects_missing_or_repeated_request_ids(case):
    policy = H2OPolicy(budget=4, recent_pages=1)
    for ids in (None, ["a", "b"], ["a", "a", "b"]):
        with pytest.raises(ValueError, match="request_ids"):
            policy.layout(context(case, ids))


def test_page_mass_sums_to_the_group_and_matches_across_backends(case):
    masses = {}
    for backend in ("torch", "triton"):
        wrapper = BatchARTDecodeWrapper(backend=backend)
        wrapper.plan(*case.plan_args(), termination=TerminationConfig(mode="off"), record_page_mass=True)
        wrapper.run(case.q, case.cache)
        stats = wrapper.last_stats
        rows = torch.arange(6, device=case.q.device).repeat_interleave(stats.selected_pages.flatten().long())
        per_row = torch.zeros(6, device=case.q.device).index_add_(0, rows, stats.page_mass)
        assert torch.allclose(per_row, torch.full_like(per_row, 4.0), rtol=1e-5)  # 4 query heads per group
        masses[backend] = stats.page_mass
    assert torch.allclose(masses["torch"], masses["triton"], rtol=1e-4, atol=1e-6)


POLICY_KWARGS = {
    "dense": dict(order="quest"),
    "streaming_llm": dict(sink_pages=1, window_pages=4),
    "quest": dict(budget=6),
    "h2o": dict(budget=6, recent_pages=2),
    "snapkv": dict(budget=6, window=8),
}


def prefill_if_needed(policy, case, request_ids, layer_id):
    """Stateful policies that learn from the prompt get it (random queries, the real keys)."""
    if not hasattr(policy, "prefill"):
        return
    for b, request_id in enumerate(request_ids):
        k, _ = gather_request_kv(case.cache, case.kv_indptr, case.kv_indices, case.kv_last_page_len, b)
        queries = torch.randn(k.shape[0], case.num_qo_heads, case.head_dim, device=k.device, dtype=k.dtype)
        policy.prefill(request_id, layer_id, queries, k, case.page_size)


def test_every_registered_policy_is_tested():
    assert set(REGISTRY) == set(POLICY_KWARGS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(POLICY_KWARGS))
@pytest.mark.parametrize("mode", list(MODES))
def test_every_policy_through_the_kernel(backend, name, mode, device):
    case = make_case([300, 9, 161], 8, 2, 64, 16, device=device, seed=4)
    policy = get(name, **POLICY_KWARGS[name])
    ids = [f"r{b}" for b in range(case.batch_size)]
    prefill_if_needed(policy, case, ids, layer_id=1)
    termination = TerminationConfig(mode=mode, eps=0.1, relative_to="values", tau_mag=0.05, tau_dir=1e-3)
    wrapper = BatchARTDecodeWrapper(backend=backend)
    wrapper.plan(*case.plan_args(), termination=termination, policy=policy, request_ids=ids)
    out = torch.full(case.q.shape, float("nan"), device=case.q.device)
    wrapper.run(case.q, case.cache, out=out, layer_id=1)
    stats = wrapper.last_stats
    budget = {"dense": 10**9, "streaming_llm": 5}.get(name, 6)
    pages = torch.tensor(case.pages_per_request(), device=stats.selected_pages.device)[:, None]
    assert torch.equal(stats.selected_pages.long(), torch.minimum(pages, torch.tensor(budget)).expand(-1, 2))
    ref, _ = exact_attention(case, stats.selection)
    if mode == "off":
        assert relative_error(out, ref).max() <= 1e-5
    elif mode == "bound":
        from test_termination import assert_bound_holds

        assert_bound_holds(case, out, termination, stats.selection)
    read, _ = exact_attention(case, stats.selection, visited=stats.visited_pages.cpu())
    assert relative_error(out, read).max() <= 1e-5  # every mode returns attention over the pages it read
    first_pages = stats.selection.pages[stats.selection.indptr[:-1].long()]
    assert (first_pages == 0).all()  # the sink leads every row


@pytest.mark.parametrize("make", [
    lambda: get("quest", budget=0),
    lambda: get("quest", budget=-3),
    lambda: get("h2o", budget=0),
    lambda: get("streaming_llm", window_pages=0),
    lambda: get("streaming_llm", sink_pages=0),
    lambda: get("dense", order="random"),
    lambda: get("no-such-policy"),
], ids=["quest-0", "quest-neg", "h2o-0", "window-0", "sink-0", "order", "name"])
def test_bad_arguments(make):
    with pytest.raises(ValueError, match="budget|window|sink|order|name"):
        make()


def test_key_box_scoring_counts_its_metadata_bytes(case):
    wrapper = BatchARTDecodeWrapper(backend="torch")
    wrapper.plan(*case.plan_args(), termination=TerminationConfig(mode="off"), policy=QuestPolicy(budget=4))
    wrapper.run(case.q, case.cache)
    stats = wrapper.last_stats
    kv = int(stats.visited_tokens.sum()) * 2 * 64 * 4
    boxes = sum(case.pages_per_request()) * 2 * (2 * 64 + 4)  # fp8 box + scale, every page of both KV heads
    assert int(stats.kv_bytes_read) == kv + boxes


def test_stateful_policy_needs_request_ids(case):
    wrapper = BatchARTDecodeWrapper(backend="torch")
    with pytest.raises(ValueError, match="request_ids"):
        wrapper.plan(*case.plan_args(), policy=H2OPolicy(budget=4, recent_pages=1))
    with pytest.raises(ValueError, match="selection and policy"):
        wrapper.plan(*case.plan_args(), policy=QuestPolicy(budget=4),
                     selection=PageSelection(case.kv_indptr, case.kv_indices))


@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_key_box_scores_for_every_head_dim(head_dim, device):
    """Head dims below the scoring kernel's D slice (16) must not read past q."""
    from art_runtime.page_scores import _key_box_scores_torch, estimated_page_log_mass, quest_page_scores

    case = make_case([300, 40], 4, 2, head_dim, 16, device=device, seed=head_dim)
    ctx, meta = context(case), case.page_meta()
    kernel = quest_page_scores(ctx, case.q, meta, 19)
    assert torch.allclose(kernel, _key_box_scores_torch(ctx, case.q, meta, 19, "max"), rtol=1e-5, atol=1e-4)
    kernel = estimated_page_log_mass(ctx, case.q, meta, 19, head_dim ** -0.5)
    reference = _key_box_scores_torch(ctx, case.q, meta, 19, "mass", head_dim ** -0.5)
    assert torch.allclose(kernel, reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("magnitude", [5e-35, 1e-30, 1e-3, 3e4, 1e30])
def test_quest_bound_on_tensor_cores_is_exact_at_any_query_scale(magnitude, device, monkeypatch):
    """Quest's bound dots in fp16 after scaling each query head's slice by a power of two, so
    bf16 queries far outside fp16's range (1e30 would be inf, 1e-30 zero) keep exact products;
    at 5e-35 (the largest |q| below 2^-112) the scale is capped at 2^126 so that its inverse
    stays a normal float (uncapped it would be 0 and so would the bound).
    Off the GPU the tensor-core path is forced (fp16 dots are exact in the interpreter too)."""
    import art_runtime.page_scores as page_scores

    monkeypatch.setattr(page_scores, "tensor_core_dots", lambda q: True)
    case = make_case([300, 200], 8, 2, 128, 16, device=device, seed=5)
    ctx, meta = context(case), case.page_meta()
    q = (case.q * magnitude).to(torch.bfloat16)
    kernel = page_scores.quest_page_scores(ctx, q, meta, 19)
    shift = 2.0 ** -round(math.log2(magnitude))  # the fp32 reference away from subnormal products
    reference = page_scores._key_box_scores_torch(ctx, q.float() * shift, meta, 19, "max") / shift
    assert torch.isfinite(kernel[:, :13]).all()
    assert torch.allclose(kernel, reference, rtol=1e-5, atol=1e-6 * magnitude)
