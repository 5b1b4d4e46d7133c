"""SnapKV policy: selections against a float64 brute-force reference, through the wrapper too."""

import math

import pytest
import torch

from art_runtime import BatchARTDecodeWrapper, PageSelection, TerminationConfig
from art_runtime.paged_cache import gather_request_kv
from art_runtime.policies import PolicyContext, SnapKVPolicy, get
from attention_cases import exact_attention, make_case

PAGE = 4
HQO, HKV, D = 4, 2, 16
# (prompt tokens, total tokens): several decode pages, a prompt ending mid-page, a request
# with fewer pages than the budget, one whose prompt ends in page 1 (page 0 its only voted page).
REQUESTS = [(61, 66), (40, 41), (10, 12), (20, 40), (8, 13)]


def make_batch(seed=0):
    return make_case([total for _, total in REQUESTS], HQO, HKV, D, PAGE, seed=seed)


def prefill_all(policy, case, layer_id, seed):
    """Prefill every request with random queries and the cache's own prompt keys.

    Returns each request's ``(queries [n_prompt, H_qo, D], keys [n_prompt, H_kv, D])``.
    """
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for b, (prompt, _) in enumerate(REQUESTS):
        keys, _ = gather_request_kv(case.cache, case.kv_indptr, case.kv_indices, case.kv_last_page_len, b)
        queries = torch.randn(prompt, HQO, D, generator=gen)
        policy.prefill(f"r{b}", layer_id, queries, keys[:prompt], PAGE)
        prompts.append((queries, keys[:prompt]))
    return prompts


def context(case, request_ids):
    return PolicyContext(case.kv_indptr, case.kv_indices, case.kv_last_page_len, HQO, HKV, PAGE, request_ids)


def reference_order(policy, queries, keys, num_pages):
    """Per KV head, the visit order from float64 loops: ``[H_kv]`` lists of logical pages."""
    n = queries.shape[0]
    group, half = HQO // HKV, policy.kernel_size // 2
    q, k = queries.double(), keys.double()
    orders = []
    for h in range(HKV):
        votes = torch.zeros(n, dtype=torch.float64)
        for g in range(h * group, (h + 1) * group):
            for i in range(n - policy.window, n):
                votes[: i + 1] += (q[i, g] @ k[: i + 1, h].T / math.sqrt(D)).softmax(-1)
        pooled = []
        for t in range(n):
            near = votes[max(0, t - half): t + half + 1]
            pooled.append(near.max() if policy.pooling == "max" else near.sum() / policy.kernel_size)
        last_prompt_page = (n - 1) // PAGE
        score = {p: max(pooled[p * PAGE:(p + 1) * PAGE]) for p in range(last_prompt_page)}
        forced = [0, num_pages - 1] + [p for p in range(num_pages - 2, max(last_prompt_page, 1) - 1, -1)]
        ranked = sorted((p for p in score if p not in forced), key=lambda p: (-score[p], p))
        orders.append((forced + ranked)[: policy.budget])
    return orders


def selected_rows(selection, layout):
    indptr = layout.indptr.tolist()
    return [selection[indptr[r]:indptr[r + 1]].tolist() for r in range(len(indptr) - 1)]


@pytest.mark.parametrize("pooling,kernel_size,window", [("max", 5, 8), ("avg", 3, 6), ("max", 1, 3)])
def test_selection_matches_reference(pooling, kernel_size, window):
    case = make_batch()
    policy = SnapKVPolicy(budget=8, window=window, kernel_size=kernel_size, pooling=pooling)
    prompts = prefill_all(policy, case, layer_id=3, seed=1)
    ctx = context(case, [f"r{b}" for b in range(len(REQUESTS))])
    layout = policy.layout(ctx)
    rows = selected_rows(policy.select(ctx, layout, 3), layout)
    for b, ((queries, keys), num_pages) in enumerate(zip(prompts, case.pages_per_request())):
        expected = reference_order(policy, queries, keys, num_pages)
        for h in range(HKV):
            assert len(rows[b * HKV + h]) == min(policy.budget, num_pages)
            assert rows[b * HKV + h] == expected[h], (b, h)


def test_wrapper_uses_the_selection_and_matches_exact_attention():
    case = make_batch(seed=2)
    policy = SnapKVPolicy(budget=6, window=4, kernel_size=3)
    ids = [f"r{b}" for b in range(len(REQUESTS))]
    prefill_all(policy, case, layer_id=0, seed=3)
    wrapper = BatchARTDecodeWrapper(backend="torch")
    wrapper.plan(*case.plan_args(), termination=TerminationConfig(mode="off"), policy=policy, request_ids=ids)
    out = wrapper.run(case.q, case.cache, layer_id=0)

    ctx = context(case, ids)
    layout = policy.layout(ctx)
    pages = policy.select(ctx, layout, 0)
    request = torch.arange(len(REQUESTS)).repeat_interleave(HKV).repeat_interleave(layout.indptr.diff().long())
    phys = case.kv_indices[case.kv_indptr[request].long() + pages.long()]
    assert torch.equal(wrapper._plan.visit_phys, phys)
    ref, _ = exact_attention(case, PageSelection(layout.indptr, pages))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    budget = torch.tensor(case.pages_per_request()).clamp(max=policy.budget)[:, None].expand(-1, HKV)
    assert torch.equal(wrapper.last_stats.visited_pages.long(), budget)
    assert torch.equal(wrapper.last_stats.selected_pages.long(), budget)


def test_decode_pages_outrank_a_page_holding_all_votes():
    case = make_case([25], HQO, HKV, D, PAGE, seed=8)  # pages 0..6; the prompt's last token in page 3
    keys, _ = gather_request_kv(case.cache, case.kv_indptr, case.kv_indices, case.kv_last_page_len, 0)
    keys = keys[:13]
    # Every window query of head g points at token 5's key of its KV head: page 1 gets nearly
    # all the votes (about window * group, more than any decode page's position).
    queries = 3 * keys[5].repeat_interleave(HQO // HKV, 0).expand(13, HQO, D).clone()
    policy = SnapKVPolicy(budget=6, window=8, kernel_size=3)
    policy.prefill("r", 0, queries, keys, PAGE)
    ctx = context(case, ["r"])
    layout = policy.layout(ctx)
    assert selected_rows(policy.select(ctx, layout, 0), layout) == [[0, 6, 5, 4, 3, 1]] * HKV


def test_layers_keep_separate_state_and_release_frees_it():
    case = make_batch(seed=4)
    policy = get("snapkv", budget=5, window=4)
    prefill_all(policy, case, layer_id=0, seed=5)
    prefill_all(policy, case, layer_id=1, seed=6)
    ids = [f"r{b}" for b in range(len(REQUESTS))]
    ctx = context(case, ids)
    layout = policy.layout(ctx)
    assert not torch.equal(policy.select(ctx, layout, 0), policy.select(ctx, layout, 1))
    with pytest.raises(ValueError, match="request_ids"):
        policy.select(ctx, layout, 2)  # a layer never prefilled

    policy.release("r0")
    for layer in (0, 1):
        with pytest.raises(ValueError, match="request_ids"):
            policy.select(ctx, layout, layer)
    policy.release("r0")  # releasing twice is harmless
    # The other requests keep their state.
    rest = PolicyContext(case.kv_indptr[1:] - case.kv_indptr[1], case.kv_indices[case.kv_indptr[1]:],
                         case.kv_last_page_len[1:], HQO, HKV, PAGE, ids[1:])
    assert policy.select(rest, policy.layout(rest), 1).numel() > 0


def test_a_released_slot_serves_a_new_request_with_its_own_votes():
    """A request that takes a finished request's slot is scored from its own prefill only."""
    case = make_batch(seed=9)
    policy = SnapKVPolicy(budget=8, window=4, kernel_size=3)
    prefill_all(policy, case, layer_id=0, seed=10)
    policy.release("r0")
    gen = torch.Generator().manual_seed(11)
    keys, _ = gather_request_kv(case.cache, case.kv_indptr, case.kv_indices, case.kv_last_page_len, 0)
    prompt = REQUESTS[0][0] - 7  # a shorter prompt: the old request's later votes must not show
    queries = torch.randn(prompt, HQO, D, generator=gen)
    policy.prefill("new", 0, queries, keys[:prompt], PAGE)
    ids = ["new"] + [f"r{b}" for b in range(1, len(REQUESTS))]
    ctx = context(case, ids)
    layout = policy.layout(ctx)
    assert int(policy._batch_slots[0]) == 0  # r0's slot
    rows = selected_rows(policy.select(ctx, layout, 0), layout)
    expected = reference_order(policy, queries, keys[:prompt], case.pages_per_request()[0])
    assert rows[:HKV] == expected


@pytest.mark.parametrize("kwargs,name", [
    ({"budget": 0}, "budget"), ({"budget": -1}, "budget"), ({"budget": 1}, "budget"),
    ({"window": 0}, "window"), ({"kernel_size": 4}, "kernel_size"), ({"kernel_size": 0}, "kernel_size"),
    ({"pooling": "mean"}, "pooling"),
])
def test_bad_fields(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SnapKVPolicy(**kwargs)


def test_bad_prefill_and_plan_arguments():
    case = make_batch(seed=7)
    policy = SnapKVPolicy(budget=4, window=8)
    queries, keys = torch.randn(5, HQO, D), torch.randn(5, HKV, D)
    with pytest.raises(ValueError, match="window"):
        policy.prefill("r", 0, queries, keys, PAGE)
    with pytest.raises(ValueError, match="keys"):
        policy.prefill("r", 0, torch.randn(9, HQO, D), torch.randn(8, HKV, D), PAGE)
    with pytest.raises(ValueError, match="page_size"):
        policy.prefill("r", 0, torch.randn(9, HQO, D), torch.randn(9, HKV, D), 0)
    with pytest.raises(ValueError, match="request_ids"):
        BatchARTDecodeWrapper(backend="torch").plan(*case.plan_args(), policy=policy)
    with pytest.raises(ValueError, match="request_ids"):
        ctx = context(case, None)
        policy.select(ctx, policy.layout(ctx))
