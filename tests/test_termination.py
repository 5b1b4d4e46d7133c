"""Termination semantics: the paper's stability rule, the certified bound and the mass estimate.

* stability: the Triton kernel and the torch backend stop at the same page; both agree with
  an independent float64 simulation of the rule; the output is exact attention over the
  pages read.
* bound: never exceeds its eps (hypothesis-generated and adversarial inputs: huge logit
  ranges, near-ties, a dominating token late in the visit order, value outliers), on split
  rows too, and does stop when the unread mass is provably small.
* mass: both backends stop where an independent float64 simulation of the estimate says,
  and return exact attention over the pages read; with eps 0 it reads everything.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from art_runtime import BatchARTDecodeWrapper, TerminationConfig, dense_selection
from art_runtime.decode import PASS_BLOCKS
from art_runtime.paged_cache import gather_request_kv, unpack_paged_kv_cache
from art_runtime.policies import DensePolicy
from art_runtime.termination import MASS_MAX_SHARE, MASS_PULL_CHECKS
from attention_cases import exact_attention, make_case, relative_error

BACKENDS = ["torch", "triton"]


NO_SPLIT = 1 << 30  # chunk_pages that keeps every row whole, whatever the device


def run(case, backend, termination, chunk_pages=NO_SPLIT, **plan_kwargs):
    """Decode with rows kept whole unless ``chunk_pages`` says otherwise (the GPU would split)."""
    wrapper = BatchARTDecodeWrapper(kv_layout=case.kv_layout, backend=backend)
    wrapper.plan(*case.plan_args(), termination=termination, chunk_pages=chunk_pages, **plan_kwargs)
    out = torch.full(case.q.shape, float("nan"), dtype=torch.float32, device=case.q.device)
    wrapper.run(case.q, case.cache, page_meta=case.page_meta(), out=out)
    return out, wrapper.last_stats


def simulate_stability(case, termination):
    """Float64, one head group at a time, one block at a time: the rule as the paper states it."""
    block = termination.pages_per_block(case.page_size)
    selection = dense_selection(case.kv_indptr.cpu(), case.num_kv_heads)
    group = case.num_qo_heads // case.num_kv_heads
    visited = torch.zeros(case.batch_size, case.num_kv_heads, dtype=torch.int64)
    for b in range(case.batch_size):
        for h in range(case.num_kv_heads):
            row = b * case.num_kv_heads + h
            order = selection.pages[selection.indptr[row]:selection.indptr[row + 1]].tolist()
            prev, streak, count = None, torch.zeros(group, dtype=torch.int64), 0
            for start in range(0, len(order), block):
                count = min(start + block, len(order))
                out, _ = exact_attention(case, selection, visited=_only(case, b, h, count))
                o = out[b, h * group:(h + 1) * group]
                if prev is not None:
                    norm, prev_norm = o.norm(dim=-1), prev.norm(dim=-1)
                    calm = ((norm - prev_norm).abs() / norm < termination.tau_mag) & (
                        1 - (o * prev).sum(-1) / (norm * prev_norm) < termination.tau_dir)
                    streak = torch.where(calm, streak + 1, 0)
                prev = o
                if count < len(order) and bool((streak >= termination.patience).all()) and count >= termination.min_pages:
                    break
            visited[b, h] = count
    return visited


def _only(case, b, h, count):
    visited = torch.zeros(case.batch_size, case.num_kv_heads, dtype=torch.int64)
    visited[b, h] = count
    return visited


STABILITY = TerminationConfig(mode="stability", tau_mag=0.1, tau_dir=1e-2, patience=2, min_pages=2, block_pages=1)


def test_stability_kernel_and_torch_backend_agree(device):
    case = make_case([1500, 700, 1100, 64], 8, 2, 64, 16, device=device, seed=11)
    _, torch_stats = run(case, "torch", STABILITY)
    _, triton_stats = run(case, "triton", STABILITY)
    assert torch.equal(torch_stats.visited_pages, triton_stats.visited_pages)
    assert torch.equal(torch_stats.stable_at, triton_stats.stable_at)
    assert (torch_stats.visited_pages < torch_stats.selected_pages).any()  # the rule did fire


@pytest.mark.parametrize("backend", BACKENDS)
def test_stability_follows_the_rule_and_returns_attention_over_read_pages(backend, device):
    case = make_case([900, 333], 6, 2, 64, 16, device=device, seed=12)
    out, stats = run(case, backend, STABILITY)
    expected = simulate_stability(case, STABILITY)
    assert torch.equal(stats.visited_pages.cpu().long(), expected)
    selection = dense_selection(case.kv_indptr, case.num_kv_heads)
    ref, _ = exact_attention(case, selection, visited=stats.visited_pages.cpu())
    assert relative_error(out, ref).max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_stability_on_split_rows_agrees_between_backends(backend, device):
    case = make_case([3000, 400], 8, 2, 64, 16, device=device, seed=13)
    loose = TerminationConfig(mode="stability", tau_mag=0.2, tau_dir=0.05, patience=2, min_pages=2, block_pages=1)
    _, reference = run(case, "torch", loose, chunk_pages=48)
    _, stats = run(case, backend, loose, chunk_pages=48)
    assert torch.equal(stats.visited_pages, reference.visited_pages)
    assert (stats.visited_pages < stats.selected_pages).any()


def adversarial_case(*, seq_lens, group, page_size, logit_scale, tie, late_dominator, value_outlier, seed, device):
    """A case whose keys, values and queries stress the bound (see the module docstring)."""
    case = make_case(seq_lens, 2 * group, 2, 64, page_size, device="cpu", seed=seed)
    k_cache, v_cache = unpack_paged_kv_cache(case.cache, case.kv_layout)
    gen = torch.Generator().manual_seed(seed + 1)
    k_cache.mul_(logit_scale)
    if tie:  # every page of a request repeats one key: many exactly equal logits
        k_cache.copy_(k_cache[:, :1].expand_as(k_cache))
    for b in range(case.batch_size):
        pages = case.kv_indices[case.kv_indptr[b]:case.kv_indptr[b + 1]]
        if late_dominator and len(pages) > 2:
            # Visit order is 0, n-1, n-2, ..., 1: logical page 1 is read last.
            k_cache[pages[1], 0] = case.q[b].view(2, group, 64).mean(1) * 4 * logit_scale
        if value_outlier:
            slot = int(torch.randint(0, len(pages), (1,), generator=gen))
            v_cache[pages[slot], 0] *= 1000.0
    to = lambda t: t.to(device)  # noqa: E731
    case.cache = to(case.cache)
    case.q, case.kv_indptr, case.kv_indices, case.kv_last_page_len = map(
        to, (case.q, case.kv_indptr, case.kv_indices, case.kv_last_page_len))
    return case


def assert_bound_holds(case, out, termination, selection=None):
    ref, _ = exact_attention(case, selection)
    err = (out.cpu().double() - ref).norm(dim=-1)
    if termination.relative_to == "output":
        allowed = termination.eps * out.cpu().double().norm(dim=-1)
    else:
        vscale = max_value_norm(case)
        allowed = termination.eps * vscale
    # Floating-point slack: what mode off has too (fp32 accumulation).
    slack = 1e-5 * ref.norm(dim=-1) + 1e-6 * max_value_norm(case)
    assert (err <= allowed + slack).all(), (err - allowed).max()


def max_value_norm(case):
    """``[B, H_qo]`` the largest |v| over each request's tokens for each query head's KV head."""
    group = case.num_qo_heads // case.num_kv_heads
    cache = tuple(t.cpu() for t in case.cache) if isinstance(case.cache, tuple) else case.cache.cpu()
    rows = []
    for b in range(case.batch_size):
        _, v = gather_request_kv(cache, case.kv_indptr.cpu(), case.kv_indices.cpu(), case.kv_last_page_len.cpu(), b,
                                 case.kv_layout)
        rows.append(v.double().norm(dim=-1).amax(0).repeat_interleave(group))
    return torch.stack(rows)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_lens=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    group=st.sampled_from([1, 2, 4, 7]),
    page_size=st.sampled_from([1, 3, 8, 16]),
    eps=st.floats(1e-3, 0.5),
    relative_to=st.sampled_from(["output", "values"]),
    logit_scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    tie=st.booleans(),
    late_dominator=st.booleans(),
    value_outlier=st.booleans(),
    split=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bound_never_exceeds_eps(seq_lens, group, page_size, eps, relative_to, logit_scale, tie, late_dominator,
                                 value_outlier, split, seed):
    case = adversarial_case(seq_lens=seq_lens, group=group, page_size=page_size, logit_scale=logit_scale, tie=tie,
                            late_dominator=late_dominator, value_outlier=value_outlier, seed=seed, device="cpu")
    termination = TerminationConfig(mode="bound", eps=eps, relative_to=relative_to, min_pages=1, block_pages=1)
    chunk = 2 if split and relative_to == "values" else NO_SPLIT
    out, stats = run(case, "torch", termination, chunk_pages=chunk)
    assert_bound_holds(case, out, termination)
    assert (stats.visited_pages <= stats.selected_pages).all()


ADVERSARIAL = [
    dict(logit_scale=100.0, tie=False, late_dominator=True, value_outlier=False),
    dict(logit_scale=10.0, tie=True, late_dominator=False, value_outlier=True),
    dict(logit_scale=1.0, tie=False, late_dominator=True, value_outlier=True),
    dict(logit_scale=0.1, tie=False, late_dominator=False, value_outlier=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stress", ADVERSARIAL, ids=lambda s: "-".join(k for k, v in s.items() if v is True) or "plain")
@pytest.mark.parametrize("relative_to,chunk_pages", [("output", NO_SPLIT), ("values", NO_SPLIT), ("values", 3)])
def test_bound_holds_on_adversarial_inputs(backend, stress, relative_to, chunk_pages, device):
    case = adversarial_case(seq_lens=[150, 17, 90], group=4, page_size=8, seed=21, device=device, **stress)
    for eps in (1e-3, 0.1):
        termination = TerminationConfig(mode="bound", eps=eps, relative_to=relative_to, min_pages=1, block_pages=1)
        out, _ = run(case, backend, termination, chunk_pages=chunk_pages)
        assert_bound_holds(case, out, termination)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cut_share", [1e-30, 1e30], ids=["cut-at-end", "cut-at-start"])
def test_bound_holds_wherever_the_estimate_puts_the_cut(backend, cut_share, monkeypatch, device):
    """The mass estimate only decides from which position on pages get their sketch bound
    (before it, no stop but the trivial one): at both extremes the guarantee holds."""
    import art_runtime.decode
    import art_runtime.reference

    for module in (art_runtime.decode, art_runtime.reference):
        monkeypatch.setattr(module, "SKETCH_CUT_SHARE", cut_share)
    case = adversarial_case(seq_lens=[150, 17, 90], group=4, page_size=8, logit_scale=10.0, tie=False,
                            late_dominator=True, value_outlier=True, seed=23, device=device)
    for relative_to in ("values", "output"):
        termination = TerminationConfig(mode="bound", eps=0.1, relative_to=relative_to, min_pages=1, block_pages=1)
        out, stats = run(case, backend, termination)
        assert_bound_holds(case, out, termination)
        if cut_share > 1:  # nothing before the cut: every selected page's sketch is read
            assert torch.equal(stats.sketch_pages, stats.selected_pages)


def concentrated_case(device, seed=31, background=0.05):
    """Keys small except the sink token, which the queries point at: the rest is provably negligible."""
    case = make_case([2000, 900], 8, 2, 64, 16, device="cpu", seed=seed)
    k_cache, _ = unpack_paged_kv_cache(case.cache, case.kv_layout)
    k_cache.mul_(background)
    group = 4
    for b in range(case.batch_size):
        sink = case.kv_indices[case.kv_indptr[b]]
        k_cache[sink, 0] = case.q[b].view(2, group, 64).mean(1) * 10.0  # logits ~20 nats above the rest
    to = lambda t: t.to(device)  # noqa: E731
    case.cache, case.q = to(case.cache), to(case.q)
    case.kv_indptr, case.kv_indices, case.kv_last_page_len = map(to, (case.kv_indptr, case.kv_indices,
                                                                      case.kv_last_page_len))
    return case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relative_to", ["output", "values"])
def test_bound_stops_early_when_the_rest_is_provably_small(backend, relative_to, device):
    case = concentrated_case(device)
    termination = TerminationConfig(mode="bound", eps=0.05, relative_to=relative_to, min_pages=2, block_pages=1)
    out, stats = run(case, backend, termination)
    assert_bound_holds(case, out, termination)
    assert (stats.visited_pages < stats.selected_pages // 2).all()
    assert (stats.stable_at >= 0).all()
    meta = case.page_meta()
    assert (stats.sketch_pages <= stats.selected_pages).all() and (stats.sketch_pages > 0).all()
    # The Triton kernel also reads the rest of the pipelined pass it stopped in, and folds none of it.
    overshoot = stats.loaded_tokens - stats.visited_tokens
    assert (overshoot >= 0).all()
    if backend == "torch":
        assert (overshoot == 0).all()
    assert (overshoot <= (PASS_BLOCKS - 1) * termination.block_pages * case.page_size).all()
    expected_bytes = (stats.loaded_tokens.long().sum() * 2 * 64 * 4 + stats.selected_pages.long().sum()
                      * meta.nbytes_per_page("bound") + stats.sketch_pages.long().sum() * meta.key_sketch_bytes_per_page())
    assert int(stats.kv_bytes_read) == int(expected_bytes)


def test_bound_kernel_and_torch_backend_agree(device):
    case = concentrated_case(device, seed=32, background=1.1)  # the stop lands inside the row
    termination = TerminationConfig(mode="bound", eps=0.05, relative_to="values", min_pages=2, block_pages=1)
    _, torch_stats = run(case, "torch", termination)
    _, triton_stats = run(case, "triton", termination)
    assert torch.equal(torch_stats.visited_pages, triton_stats.visited_pages)
    assert (torch_stats.visited_pages > 2).any()
    # Both visit the tails after the cut in the same order (the sink and current page first).
    assert torch.equal(torch_stats.selection.pages.cpu(), triton_stats.selection.pages.cpu())
    planned = dense_selection(case.kv_indptr.cpu(), case.num_kv_heads).pages
    assert not torch.equal(torch_stats.selection.pages.cpu(), planned)
    rows = torch_stats.selection.indptr.cpu()
    for r in range(len(rows) - 1):
        visited, policy = torch_stats.selection.pages.cpu()[rows[r]:rows[r + 1]], planned[rows[r]:rows[r + 1]]
        assert torch.equal(visited[:2], policy[:2]) and torch.equal(visited.sort().values, policy.sort().values)


def test_min_pages_is_always_read(device):
    case = concentrated_case(device, seed=33)
    termination = TerminationConfig(mode="bound", eps=0.5, relative_to="values", min_pages=37, block_pages=1)
    _, stats = run(case, "torch", termination)
    assert (stats.visited_pages >= 37).all()


# (chunk_pages, pre-pass segment pages): split rows (suffixes end at chunk ends), and whole rows
# scanned in several segments that segment_carry_kernel joins.
PREPASS_LAYOUTS = [(8, 64), (None, 16)]


@pytest.mark.parametrize("chunk_pages,segment_pages", PREPASS_LAYOUTS)
def test_bound_suffix_terms_agree_between_backends(chunk_pages, segment_pages, device, monkeypatch):
    """The Triton bound pre-pass writes what the torch backend computes."""
    import art_runtime.decode
    from art_runtime.reference import bound_terms_torch, tail_start

    monkeypatch.setattr(art_runtime.decode, "SEGMENT_PAGES", segment_pages)
    # A late dominating page keeps a whole row's cut at its end; split rows cut inside chunks.
    case = adversarial_case(seq_lens=[500, 70], group=7, page_size=16, logit_scale=30.0, tie=False,
                            late_dominator=chunk_pages is not None, value_outlier=True, seed=41, device=device)
    termination = TerminationConfig(mode="bound", eps=0.05, relative_to="values", min_pages=1)
    wrapper = BatchARTDecodeWrapper(backend="triton")
    wrapper.plan(*case.plan_args(), termination=termination, chunk_pages=chunk_pages)
    meta = case.page_meta()
    wrapper.run(case.q, case.cache, page_meta=meta)
    terms = bound_terms_torch(wrapper._plan, case.q, meta)
    assert torch.equal(wrapper._sketch_pages, terms.sketch_pages)
    sketched = terms.log2_rest_mass[:, 0] < float("inf")  # from the cut on; before it no stop
    assert sketched.any() and not sketched.all()
    for kernel, reference in ((wrapper._log2w, terms.log2_rest_mass), (wrapper._log2w_low, terms.log2_rest_mass_low),
                              (wrapper._log2wv, terms.log2_rest_value_mass)):
        assert torch.allclose(kernel[:, :7], reference, rtol=1e-5, atol=1e-3)
        assert not reference.isnan().any()
    assert terms.log2_rest_mass[sketched].isfinite().all()  # pages after the cut: box or sketch bounds
    assert (terms.log2_rest_mass[~sketched] == float("inf")).all()
    assert torch.allclose(wrapper._vrest, terms.value_rest, rtol=1e-6)
    assert (terms.log2_rest_mass_low <= terms.log2_rest_mass).all()
    # Both visit the tails after the cut in the order of their mass bounds, and the kernel reads that order.
    plan = wrapper._plan
    assert not torch.equal(terms.visit_perm, torch.arange(plan.nnz, device=device))
    first_free = tail_start(plan, terms.sketch_pages)  # the cut, but never inside the first min_pages
    for start, end, free, row, sketched_pages in zip(plan.work_start.tolist(), plan.work_end.tolist(),
                                                     first_free.tolist(), plan.work_row.tolist(),
                                                     terms.sketch_pages.tolist()):
        assert max(start, end - sketched_pages) <= free <= end
        assert free >= int(plan.row_start[row]) + termination.min_pages or free == end
        assert terms.visit_perm[start:free].tolist() == list(range(start, free))
        assert sorted(terms.visit_perm[free:end].tolist()) == list(range(free, end))
    assert torch.equal(wrapper._visit_phys, plan.visit_phys[terms.visit_perm])
    assert torch.equal(wrapper._visit_tokens, plan.visit_tokens[terms.visit_perm])
    assert torch.equal(wrapper.last_stats.selection.pages, wrapper._selection.pages[terms.visit_perm])


def test_tail_visit_order_sorts_each_tail_and_keeps_the_rest():
    """``tail_visit_order`` on work items with gaps between them (fixed-capacity plans), ties,
    infinite and NaN keys, and tails that start at, inside and past the item: each tail by its
    key, largest first, ties by position; every other position in place."""
    from types import SimpleNamespace

    from art_runtime.reference import tail_visit_order

    gen = torch.Generator().manual_seed(5)
    starts = torch.tensor([0, 9, 30, 31, 60], dtype=torch.int32)
    ends = torch.tensor([9, 28, 31, 59, 61], dtype=torch.int32)
    first = torch.tensor([3, 9, 31, 40, 60])
    plan = SimpleNamespace(work_start=starts, work_end=ends, max_work_blocks=7, block_pages=4, nnz=64)
    key = torch.randint(-3, 4, (64,), generator=gen).float() * 0.75  # many ties
    key[45] = float("-inf")
    key[50] = float("nan")  # no bound known: first in its tail
    perm = tail_visit_order(plan, key, first)
    key[50] = float("inf")
    covered = torch.zeros(64, dtype=torch.bool)
    for start, end, tail in zip(starts.tolist(), ends.tolist(), first.tolist()):
        covered[start:end] = True
        assert perm[start:tail].tolist() == list(range(start, tail))
        expected = sorted(range(tail, end), key=lambda p: (-float(key[p]), p))
        assert perm[tail:end].tolist() == expected
    assert torch.equal(perm[~covered], torch.arange(64)[~covered])


@pytest.mark.parametrize("chunk_pages,page_size,block_pages", [(None, 16, 8), (24, 16, 8), (12, 5, 3), (None, 1, 128)])
def test_mass_suffix_terms_agree_between_backends(chunk_pages, page_size, block_pages, device):
    """The Triton mass pre-pass (block estimates, then their suffix sums over each work item)
    writes at every block's first position what the torch backend computes there: blocks of
    split rows end at their chunk's end; block page counts that are not powers of two."""
    from art_runtime.reference import bound_terms_torch

    case = adversarial_case(seq_lens=[1400 if page_size == 1 else 700, 70], group=4, page_size=page_size,
                            logit_scale=10.0, tie=False, late_dominator=False, value_outlier=True, seed=43,
                            device=device)
    termination = TerminationConfig(mode="mass", eps=0.02, min_pages=1, block_pages=block_pages)
    wrapper = BatchARTDecodeWrapper(backend="triton")
    wrapper.plan(*case.plan_args(), termination=termination, chunk_pages=chunk_pages)
    meta = case.page_meta()
    wrapper.run(case.q, case.cache, page_meta=meta)
    plan = wrapper._plan
    assert plan.split == (chunk_pages is not None)
    firsts = torch.cat([torch.arange(int(s), int(e), block_pages) for s, e in zip(plan.work_start, plan.work_end)])
    suffixes = bound_terms_torch(plan, case.q, meta).log2_rest_mass
    reference = suffixes[firsts.to(device)]
    assert reference.isfinite().all()
    assert torch.allclose(wrapper._log2w[firsts.to(device), :4], reference, rtol=1e-5, atol=1e-3)
    assert wrapper._vrest.numel() == 0  # mode mass's check never reads the value norms
    # Each item's predicted length: its blocks at which some head's estimated share is above eps
    # (up to the estimates' rounding: the GPU dots them in bf16); the launch takes the longest first.
    predicted = wrapper._predicted_blocks.tolist()
    for w, (s, e) in enumerate(zip(plan.work_start.tolist(), plan.work_end.tolist())):
        item = suffixes[torch.arange(s, e, block_pages, device=device)]  # [blocks, G]
        share = item - item[0] - math.log2(termination.eps)
        assert int((share > 2e-3).any(-1).sum()) <= predicted[w] <= int((share > -2e-3).any(-1).sum())
    assert 0 < min(predicted) < max(predicted)
    order = wrapper._work_order.tolist()
    if wrapper._longest_first:  # more items than parallel programs (always on the CPU)
        assert [predicted[w] for w in order] == sorted(predicted, reverse=True)
    else:
        assert order == list(range(plan.num_work))


def test_mass_launch_order_changes_nothing(device):
    """Work items launched longest first give exactly what the plain launch order gives."""
    case = structured_case(device, seed=11)
    results = []
    for longest_first in (False, True):
        wrapper = BatchARTDecodeWrapper(backend="triton")
        wrapper.plan(*case.plan_args(), termination=MASS, chunk_pages=24)
        wrapper._longest_first = longest_first  # the plan decides by the device's size; force both
        out = wrapper.run(case.q, case.cache, page_meta=case.page_meta())
        order = wrapper._work_order.tolist()
        assert (order != sorted(order)) == longest_first
        results.append((out, wrapper.last_stats.visited_pages))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert (results[0][1] < wrapper.last_stats.selected_pages).any()  # some rows stopped early


def simulate_mass(case, termination):
    """Float64: mode ``mass``'s rule (``art_runtime.termination``): the estimated unread share
    from the stored key boxes, times the distance from ``o_t`` to the mean value of the block
    read at the last measurement (every ``MASS_PULL_CHECKS`` checks, once a share is small)."""
    block = termination.pages_per_block(case.page_size)
    selection = dense_selection(case.kv_indptr.cpu(), case.num_kv_heads)
    group = case.num_qo_heads // case.num_kv_heads
    meta = case.page_meta()
    scale = 1 / math.sqrt(case.head_dim)
    visited = torch.zeros(case.batch_size, case.num_kv_heads, dtype=torch.int64)
    cache = tuple(t.cpu() for t in case.cache) if isinstance(case.cache, tuple) else case.cache.cpu()
    for b in range(case.batch_size):
        first, n = int(case.kv_indptr[b]), case.pages_per_request()[b]
        last_len = int(case.kv_last_page_len[b])
        _, v = gather_request_kv(cache, case.kv_indptr.cpu(), case.kv_indices.cpu(), case.kv_last_page_len.cpu(), b,
                                 case.kv_layout)  # [tokens, H_kv, D]
        for h in range(case.num_kv_heads):
            row = b * case.num_kv_heads + h
            order = selection.pages[selection.indptr[row]:selection.indptr[row + 1]].cpu().long()
            phys = case.kv_indices.cpu()[first + order].long()
            lo, hi = (x.cpu().double() for x in meta.key_bounds(phys.to(meta.key_scale.device), h))
            q = case.q[b, h * group:(h + 1) * group].cpu().double()  # [G, D]
            tokens = torch.where(order == n - 1, last_len, case.page_size).double()
            est = (q @ ((lo + hi) / 2).T) * scale + (q.square() @ ((hi - lo) / 4).square().T) * scale**2 / 2 + tokens.log()
            count = len(order)
            pull_sq, o_sq = torch.full((group,), math.inf, dtype=torch.float64), torch.zeros(group, dtype=torch.float64)
            for start in range(0, len(order), block):
                count_here = min(start + block, len(order))
                if count_here >= len(order):
                    count = len(order)
                    break
                out, lse = exact_attention(case, selection, visited=_only(case, b, h, count_here))
                o_t = out[b, h * group:(h + 1) * group]  # [G, D]
                read = lse[b, h * group:(h + 1) * group] * math.log(2)  # natural log of the read mass
                rest = torch.logsumexp(est[:, count_here:], -1)
                fraction = torch.sigmoid(rest - read)  # West / (L + West)
                block_tokens = (order[start:count_here, None] * case.page_size + torch.arange(case.page_size)).flatten()
                block_mean = v[block_tokens[block_tokens < v.shape[0]], h].double().mean(0)
                share_ok = fraction <= MASS_MAX_SHARE
                if (start // block) % MASS_PULL_CHECKS == 0 and bool(share_ok.any()):  # measure the pull
                    pull_sq, o_sq = (o_t - block_mean).square().sum(-1), o_t.square().sum(-1)
                ok = share_ok & (fraction.square() * pull_sq <= termination.eps ** 2 * o_sq)
                if bool(ok.all()) and count_here >= termination.min_pages:
                    count = count_here
                    break
            visited[b, h] = count
    return visited


MASS = TerminationConfig(mode="mass", eps=0.05, min_pages=2, block_pages=1)


def structured_case(device, seed, num_qo_heads=8, num_kv_heads=2):
    """Attention with structure, so the estimate can stop: a few pages aligned with the queries,
    and values with a common component (as real values have), so that o is not a mean of noise."""
    case = make_case([1500, 700, 1100, 64], num_qo_heads, num_kv_heads, 64, 16, device="cpu", seed=seed)
    k_cache, v_cache = unpack_paged_kv_cache(case.cache, case.kv_layout)
    gen = torch.Generator().manual_seed(seed)
    v_cache += 2 * torch.randn(case.num_kv_heads, case.head_dim, generator=gen).to(v_cache.dtype)
    for b in range(case.batch_size):
        pages = case.kv_indices[case.kv_indptr[b]:case.kv_indptr[b + 1]]
        for page in pages[torch.randperm(len(pages), generator=gen)[:2]]:
            k_cache[page] += case.q[b].view(num_kv_heads, -1, 64).mean(1) * 0.6
    case.cache = case.cache.to(device)
    case.q, case.kv_indptr, case.kv_indices, case.kv_last_page_len = (
        t.to(device) for t in (case.q, case.kv_indptr, case.kv_indices, case.kv_last_page_len))
    return case


@pytest.mark.parametrize("backend", BACKENDS)
def test_mass_stops_where_the_estimate_says_and_returns_attention_over_read_pages(backend, device):
    case = structured_case(device, seed=21)
    out, stats = run(case, backend, MASS)
    expected = simulate_mass(case, MASS)
    assert torch.equal(stats.visited_pages.cpu().long(), expected)
    assert (stats.visited_pages < stats.selected_pages).any()  # the estimate did stop somewhere
    selection = dense_selection(case.kv_indptr, case.num_kv_heads)
    ref, _ = exact_attention(case, selection, visited=stats.visited_pages.cpu())
    assert relative_error(out, ref).max() <= 1e-5


@pytest.mark.parametrize("num_qo_heads", [8, 14, 32])  # GQA groups of 4, 7 and 16 query heads
def test_mass_kernel_and_torch_backend_agree_on_split_rows(num_qo_heads, device):
    # Group 16 fills a 16-row tile: the kernel then pads to 32 rows for the plain-mean row.
    case = structured_case(device, seed=22, num_qo_heads=num_qo_heads)
    _, reference = run(case, "torch", MASS, chunk_pages=24)
    _, stats = run(case, "triton", MASS, chunk_pages=24)
    assert torch.equal(stats.visited_pages, reference.visited_pages)
    assert torch.equal(stats.stable_at, reference.stable_at)
    assert (reference.visited_pages < reference.selected_pages).any()  # some chunk stopped


@pytest.mark.parametrize("backend", BACKENDS)
def test_mass_deals_a_split_rows_blocks_to_its_chunks(backend, device):
    """Split rows in mode mass: the per-layer selection writes each row's order through the
    plan's slots (its blocks dealt to its chunks in turn), and both backends stop alike."""
    case = structured_case(device, seed=23)
    runs = {}
    for chunk_pages in (NO_SPLIT, 24):
        wrapper = BatchARTDecodeWrapper(backend=backend)
        wrapper.plan(*case.plan_args(), termination=MASS, chunk_pages=chunk_pages, policy=DensePolicy(order="mass"))
        out = wrapper.run(case.q, case.cache, page_meta=case.page_meta())
        runs[chunk_pages] = (wrapper._plan, out, wrapper.last_stats)
    assert runs[NO_SPLIT][0].visit_slot is None
    plan, _, stats = runs[24]
    order = runs[NO_SPLIT][2].selection.pages
    assert plan.split and torch.equal(stats.selection.pages[plan.visit_slot.long()], order)
    assert not torch.equal(stats.selection.pages, order)  # some block moved to a later chunk
    _, reference = run(case, "torch", MASS, chunk_pages=24, policy=DensePolicy(order="mass"))
    assert torch.equal(stats.visited_pages, reference.visited_pages)
    assert (stats.visited_pages < stats.selected_pages).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mass_with_eps_zero_reads_everything(backend, device):
    case = structured_case(device, seed=23)
    out, stats = run(case, backend, TerminationConfig(mode="mass", eps=0.0, block_pages=1))
    assert torch.equal(stats.visited_pages, stats.selected_pages)
    ref, _ = exact_attention(case, dense_selection(case.kv_indptr, case.num_kv_heads))
    assert relative_error(out, ref).max() <= 1e-5
