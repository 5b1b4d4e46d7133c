"""``ARTAttnBackend`` built by SGLang's own registry on SGLang's test kit's mock model runner.

On the CPU both SGLang's Triton backend and ART run their Triton kernels under the Triton
interpreter (float32), on the same KV pool and batch: page size 16, GQA 8 query / 2 KV heads,
head_dim 64, requests of different lengths with partial last pages, pages shuffled.
"""

from __future__ import annotations

import time
import types

import pytest
import torch

from sglang_support import import_sglang

registry = import_sglang()

from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit  # noqa: E402

from art_runtime import BatchARTDecodeWrapper, PageMetadata  # noqa: E402
from art_runtime.policies import get as get_policy  # noqa: E402
from art_runtime.integrations.sglang.backend import ARTAttnBackend, memory_per_page  # noqa: E402
from art_runtime.integrations.sglang.options import ARTOptions  # noqa: E402
from art_runtime.integrations.sglang.paging import page_table  # noqa: E402
from art_runtime.integrations.sglang.telemetry import DecodeTelemetry, prometheus_counters  # noqa: E402

load_plugins()

PAGE, HQ, HKV, DIM, MAX_CONTEXT = 16, 8, 2, 64, 512
DTYPE, DEVICE = torch.float32, "cpu"
PREFIX_LENS = (300, 37, 177)  # 19, 3 and 12 pages, partial last pages after the decode token
SEED = 7


@pytest.fixture(autouse=True)
def clean_art_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("ART_"):
            monkeypatch.delenv(key)


class Scenario:
    """A mock runner (its KV pool), one attention layer, and forward batches over fixed slots."""

    def __init__(self, prefix_lens=PREFIX_LENS, page_size=PAGE, tp_size=1, heads=(HQ, HKV)):
        """``heads``: the model's query and KV heads; this rank holds its ``tp_size``-th share (SGLang's rule)."""
        self.prefix_lens, self.page_size = prefix_lens, page_size
        self.model_heads = heads
        self.heads = (heads[0] // tp_size, max(1, heads[1] // tp_size))
        case = self.case(ForwardMode.DECODE)
        self.runner = kit.MockModelRunner(
            case=case, model_config=kit.TinyModelConfig(num_heads=heads[0], num_kv_heads=heads[1], head_dim=DIM,
                                                        hidden_size=DIM, context_len=MAX_CONTEXT),
            dtype=DTYPE, device=DEVICE, max_context_len=MAX_CONTEXT, head_dim=DIM)
        # The kit's config asserts that the KV heads divide among the ranks; SGLang's ModelConfig
        # replicates them when they don't (get_num_kv_heads: max(1, kv_heads // tp)).
        self.runner.model_config.get_num_kv_heads = lambda tp, dcp=1: max(1, heads[1] // (tp // dcp))
        self.layer = RadixAttention(num_heads=self.heads[0], head_dim=DIM, scaling=DIM ** -0.5,
                                    num_kv_heads=self.heads[1], layer_id=0)
        # Every position of every request mapped, so that batches of other lengths reuse the slots.
        self.loc_fn = kit.make_loc_fn("shuffled_pages", batch_size=case.batch_size,
                                      seq_lens=(MAX_CONTEXT,) * case.batch_size, prefix_lens=case.prefix_lens,
                                      page_size=page_size, max_context_len=MAX_CONTEXT, seed=SEED)

    def case(self, mode, prefix_lens=None, extend_lens=()):
        return kit.DenseAttentionCase(name="art", backend="art", forward_mode=mode, num_heads=self.heads[0],
                                      num_kv_heads=self.heads[1], page_size=self.page_size,
                                      prefix_lens=prefix_lens or self.prefix_lens, extend_lens=extend_lens)

    def batch(self, mode=ForwardMode.DECODE, prefix_lens=None, extend_lens=()):
        return kit._make_forward_batch(self.case(mode, prefix_lens, extend_lens), self.runner,
                                       max_context_len=MAX_CONTEXT, device=DEVICE, loc_fn=self.loc_fn)

    def backend(self, name, **options):
        """A backend built by SGLang's registry (ART options through the environment, as in a server)."""
        import os

        for key, value in options.items():
            os.environ[f"ART_{key.upper()}"] = str(value)
        return registry.ATTENTION_BACKENDS[name](self.runner)

    def write_prefix(self, keys, values):
        """Store ``[sum(prefix), H_kv, D]`` keys/values of every request's prefix in the pool."""
        locs = [self.loc_fn(r, p) for r, n in enumerate(self.prefix_lens) for p in range(n)]
        self.runner.token_to_kv_pool.set_kv_buffer(self.layer, torch.tensor(locs), keys, values)

    def decode(self, backend, q, k, v, graph=False, prefix_lens=None):
        """One decode step of ``backend``; ``graph``: through the CUDA-graph metadata path (buffers made once)."""
        batch = self.batch(prefix_lens=prefix_lens)
        with torch.no_grad():
            if graph:
                if backend.graph_decode is None:
                    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
                backend.init_forward_metadata_out_graph(batch)
            else:
                backend.init_forward_metadata(batch)
            return backend.forward_decode(q.reshape(q.shape[0], -1), k, v, self.layer, batch).view_as(q)

    def fill_pool(self, gen):
        """Random K/V in every slot of the pool; returns the pool as FlashInfer NHD pages."""
        pool = self.runner.token_to_kv_pool
        for buffer in (pool.get_key_buffer(0), pool.get_value_buffer(0)):
            buffer.copy_(torch.randn(buffer.shape, generator=gen))
        return self.paged_pool()

    def paged_pool(self):
        pool = self.runner.token_to_kv_pool
        return tuple(b.view(-1, self.page_size, *b.shape[1:]) for b in (pool.get_key_buffer(0), pool.get_value_buffer(0)))

    def pool_metadata(self):
        """``PageMetadata`` of every page of the pool (a server keeps it current from prefill on)."""
        cache = self.paged_pool()
        pages = cache[0].shape[0]
        every_page = (torch.tensor([0, pages], dtype=torch.int32), torch.arange(pages, dtype=torch.int32),
                      torch.tensor([self.page_size], dtype=torch.int32))
        return PageMetadata.from_cache(cache, *every_page)

    def page_table(self, seq_lens):
        """Page table of requests ``0..B-1`` with ``seq_lens`` tokens, from the slot mapping (int32)."""
        pages = [self.loc_fn(r, j * self.page_size) // self.page_size
                 for r, n in enumerate(seq_lens) for j in range(-(-n // self.page_size))]
        indptr = torch.tensor([0] + list(torch.tensor([-(-n // self.page_size) for n in seq_lens]).cumsum(0)))
        last = torch.tensor([n - (-(-n // self.page_size) - 1) * self.page_size for n in seq_lens])
        return indptr.int(), torch.tensor(pages).int(), last.int()


def structured_inputs(prefix_lens=PREFIX_LENS):
    """Attention that concentrates on each request's sink page, so that the bound can stop early.

    Returns ``keys, values [sum(prefix), H_kv, D]`` and the decode step's ``q [B, H_qo, D]``,
    ``k, v [B, H_kv, D]``.
    """
    gen = torch.Generator().manual_seed(SEED)
    direction = torch.randn(HKV, DIM, generator=gen)
    direction = direction / direction.norm(dim=-1, keepdim=True) * DIM ** 0.5  # logit 8 against itself
    keys, values = [], []
    for n in prefix_lens:
        k = 0.1 * torch.randn(n, HKV, DIM, generator=gen)
        k[:PAGE] += direction
        keys.append(k)
        values.append(torch.randn(n, HKV, DIM, generator=gen))
    batch = len(prefix_lens)
    q = direction.repeat_interleave(HQ // HKV, 0)[None] + 0.1 * torch.randn(batch, HQ, DIM, generator=gen)
    k_new = 0.1 * torch.randn(batch, HKV, DIM, generator=gen)
    v_new = torch.randn(batch, HKV, DIM, generator=gen)
    return torch.cat(keys), torch.cat(values), q, k_new, v_new


def random_inputs(prefix_lens=PREFIX_LENS):
    gen = torch.Generator().manual_seed(SEED + 1)
    n, batch = sum(prefix_lens), len(prefix_lens)
    return (torch.randn(n, HKV, DIM, generator=gen), torch.randn(n, HKV, DIM, generator=gen),
            torch.randn(batch, HQ, DIM, generator=gen), torch.randn(batch, HKV, DIM, generator=gen),
            torch.randn(batch, HKV, DIM, generator=gen))


def reference(scenario, inputs):
    """SGLang's own Triton backend on the same pool and batch."""
    keys, values, q, k, v = inputs
    scenario.write_prefix(keys, values)
    return scenario.decode(scenario.backend("triton"), q, k, v)


def test_registry_builds_art_and_refuses_page_size_one():
    scenario = Scenario()
    backend = scenario.backend("art")
    assert isinstance(backend, ARTAttnBackend)
    assert backend.options == ARTOptions()
    with pytest.raises(ValueError, match="pass --page-size 16"):
        Scenario(page_size=1).backend("art")


def _allocated_bytes(backend) -> int:
    """Bytes of the backend's page metadata and policy buffers (shared storages once)."""
    storages = {}
    tensors = [t for meta in backend.page_meta or () for t in vars(meta).values() if isinstance(t, torch.Tensor)]
    tensors += [t for t in vars(backend.policy).values() if isinstance(t, torch.Tensor)] if backend.policy else []
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("options, sketch", [
    ({"policy": "none"}, None),  # mode off, no policy: no metadata
    ({"policy": "quest", "budget": 5}, False),  # Quest reads boxes, never the sketch
    ({"policy": "h2o", "budget": 12}, None),  # per-page state only
    ({"policy": "none", "mode": "mass"}, False),
    ({"policy": "snapkv", "budget": 5, "mode": "bound"}, True),
])
def test_art_memory_is_counted_in_the_kv_pool(options, sketch, monkeypatch):
    """What the backend allocates per page is ``memory_per_page``; the plugin's hook adds it to
    SGLang's KV bytes per token (its real ``_compute_cell_size``), so the pool leaves room for it."""
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator
    from sglang.srt.runtime_context import get_parallel

    scenario = Scenario()
    backend = scenario.backend("art", **options)
    per_page = memory_per_page(backend.options, PAGE, DIM)
    assert _allocated_bytes(backend) == per_page * backend.num_layers * backend.num_pages * HKV
    assert (backend.page_meta is not None and backend.page_meta[0].has_sketch) == bool(sketch)

    layers, tp_size, kv_heads = 24, 2, 8
    model = types.SimpleNamespace(head_dim=DIM, v_head_dim=DIM, is_draft_model=False,
                                  get_num_kv_heads=lambda tp, dcp=1: kv_heads // tp,
                                  hf_config=types.SimpleNamespace(architectures=["LlamaForCausalLM"]))
    configurator = DefaultPoolConfigurator.__new__(DefaultPoolConfigurator)  # sizing only, no pool
    configurator.kv_cache_dtype_str = "auto"
    cells = {}
    for attention in ("art", "triton"):
        server = types.SimpleNamespace(attention_backend=attention, decode_attention_backend=None,
                                       prefill_attention_backend=None, enable_hisparse=False)
        kvc = types.SimpleNamespace(model_config=model, server_args=server, kv_cache_dtype=torch.bfloat16,
                                    use_mla_backend=False, is_draft_worker=False, page_size=PAGE)
        with get_parallel().override(tp_size=tp_size, attn_tp_size=tp_size, moe_tp_size=tp_size, attn_dcp_size=1,
                                     enable_dsa_cache_layer_split=False):
            cells[attention] = configurator._compute_cell_size(kvc, layers)
    assert cells["triton"] == (kv_heads // tp_size) * 2 * DIM * layers * 2  # K and V, bf16
    assert cells["art"] - cells["triton"] == -(-layers * (kv_heads // tp_size) * per_page // PAGE)


@pytest.mark.parametrize("inputs", [random_inputs, structured_inputs])
def test_mode_off_matches_sglang_triton(inputs):
    scenario = Scenario()
    data = inputs()
    expected = reference(scenario, data)
    scenario.write_prefix(*data[:2])
    backend = scenario.backend("art", mode="off")
    actual = scenario.decode(backend, *data[2:])
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-5)
    stats = backend.decode.last_stats
    pages = torch.tensor([-(-(n + 1) // PAGE) for n in PREFIX_LENS])
    assert torch.equal(stats.visited_pages, pages[:, None].expand(-1, HKV).int())  # every page read


@pytest.mark.parametrize("relative_to", ["values", "output"])
def test_bound_mode_stays_within_eps_and_stops_early(relative_to):
    eps = 0.1
    scenario = Scenario()
    data = structured_inputs()
    expected = reference(scenario, data)
    scenario.write_prefix(*data[:2])
    backend = scenario.backend("art", mode="bound", eps=eps, relative_to=relative_to)
    # The prefix was stored around the backend; let it see the pool as a server's prefill would.
    backend.page_meta[0] = PageMetadata.from_cache(
        (backend.token_to_kv_pool.get_key_buffer(0).view(-1, PAGE, HKV, DIM),
         backend.token_to_kv_pool.get_value_buffer(0).view(-1, PAGE, HKV, DIM)),
        *scenario.page_table(PREFIX_LENS))
    actual = scenario.decode(backend, *data[2:])
    stats = backend.decode.last_stats
    longer_than_a_block = stats.selected_pages > 64 // PAGE  # the first check comes after one block
    assert bool((stats.visited_pages < stats.selected_pages)[longer_than_a_block].all()), "never stopped early"
    error = (actual - expected).norm(dim=-1)  # [B, H_qo]
    if relative_to == "values":
        keys, values, q, k, v = data
        scale = torch.stack([torch.cat([part, v[b:b + 1]]).norm(dim=-1).amax(0)
                             for b, part in enumerate(values.split(PREFIX_LENS))])  # [B, H_kv]: max |v|
        allowed = eps * scale.repeat_interleave(HQ // HKV, 1)
    else:
        allowed = eps * actual.norm(dim=-1)
    assert bool((error <= allowed + 1e-5).all()), (error / allowed).max()
    assert float(error.max()) > 0  # it did skip attention mass


def test_cuda_graph_path_matches_eager():
    """The fixed-buffer plan (what a captured graph replays) gives the eager plan's results."""
    scenario = Scenario()
    data = structured_inputs()
    scenario.write_prefix(*data[:2])
    results = []
    for graph in (False, True):
        backend = scenario.backend("art", mode="bound", eps=0.1, relative_to="values")
        backend.page_meta[0] = PageMetadata.from_cache(
            (backend.token_to_kv_pool.get_key_buffer(0).view(-1, PAGE, HKV, DIM),
             backend.token_to_kv_pool.get_value_buffer(0).view(-1, PAGE, HKV, DIM)),
            *scenario.page_table(PREFIX_LENS))
        out = scenario.decode(backend, *data[2:], graph=graph)
        results.append((out, backend.decode.last_stats.visited_pages, backend.telemetry.accumulator.clone()))
    (eager, eager_visited, eager_acc), (graph, graph_visited, graph_acc) = results
    torch.testing.assert_close(graph, eager, atol=1e-6, rtol=1e-6)
    assert torch.equal(graph_visited, eager_visited)
    assert torch.equal(graph_acc, eager_acc)
    assert int(graph_acc[0, 0].sum()) == int(graph_visited.sum())  # visited pages reached the accumulator


POLICIES = [  # (ART options, the policy object the reference plans with)
    ({"policy": "none"}, None),
    ({"policy": "dense"}, get_policy("dense")),
    ({"policy": "dense", "order": "quest"}, get_policy("dense", order="quest")),
    ({"policy": "dense", "order": "recency"}, get_policy("dense", order="recency")),
    ({"policy": "quest", "budget": 5}, get_policy("quest", budget=5)),
    ({"policy": "streaming_llm", "budget": 4}, get_policy("streaming_llm", sink_pages=1, window_pages=3)),
]
OTHER_LENS = (90, 410, 16)  # a second batch: other lengths, a longer and a one-page request


@pytest.mark.parametrize("options, policy", POLICIES, ids=[" ".join(map(str, o.values())) for o, _ in POLICIES])
def test_every_policy_graph_and_eager_paths_match_the_wrapper(options, policy):
    """Graph path (fixed buffers refilled for two batches in turn) and eager path against ``plan(policy=...)``."""
    scenario = Scenario()
    gen = torch.Generator().manual_seed(SEED + 3)
    scenario.fill_pool(gen)
    termination = dict(mode="stability", tau_mag=0.3, tau_dir=0.2, patience=1, block_pages=1)
    graph_backend = scenario.backend("art", **options, **termination)
    eager_backend = scenario.backend("art", **options, **termination)
    assert repr(graph_backend.policy) == repr(policy)
    if graph_backend.page_meta is not None:
        graph_backend.page_meta[0] = scenario.pool_metadata()
        eager_backend.page_meta[0] = graph_backend.page_meta[0]  # one pool: one metadata
    for prefix_lens in (PREFIX_LENS, OTHER_LENS):
        q = torch.randn(3, HQ, DIM, generator=gen)
        k, v = torch.randn(2, 3, HKV, DIM, generator=gen)
        out = scenario.decode(graph_backend, q, k, v, graph=True, prefix_lens=prefix_lens)
        stats = graph_backend.decode.last_stats
        seq_lens = [n + 1 for n in prefix_lens]
        expected = BatchARTDecodeWrapper(backend="triton")
        expected.plan(*scenario.page_table(seq_lens), HQ, HKV, DIM, PAGE, termination=graph_backend.termination,
                      policy=policy, chunk_pages=1 << 20)
        meta = None if graph_backend.page_meta is None else graph_backend.page_meta[0]
        reference = expected.run(q, scenario.paged_pool(), page_meta=meta)
        reference_stats = expected.last_stats
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
        assert torch.equal(stats.selected_pages, reference_stats.selected_pages)
        assert torch.equal(stats.visited_pages, reference_stats.visited_pages)
        assert bool((stats.visited_pages < stats.selected_pages).any())  # ART stopped early: the order matters
        nnz = int(reference_stats.selection.indptr[-1])
        assert torch.equal(stats.selection.indptr, reference_stats.selection.indptr)
        assert torch.equal(stats.selection.pages[:nnz], reference_stats.selection.pages[:nnz])
        if policy is not None and policy.name != "dense":
            assert bool((stats.selected_pages < torch.tensor(seq_lens)[:, None] // PAGE).any())  # it did drop pages
    # The eager path on the second batch (the step written again: same slots, same values).
    eager = scenario.decode(eager_backend, q, k, v, prefix_lens=OTHER_LENS)
    torch.testing.assert_close(eager, out, atol=0, rtol=0)
    assert torch.equal(eager_backend.decode.last_stats.visited_pages, stats.visited_pages)


def test_h2o_state_per_page_matches_the_library_policy_over_steps():
    """H2O's page-keyed state (graph path) against ``H2OPolicy`` keyed by request, step after step."""
    prefix_lens = (319, 47, 175)  # the second step of each request starts a new page
    scenario = Scenario(prefix_lens=prefix_lens)
    gen = torch.Generator().manual_seed(SEED + 5)
    scenario.fill_pool(gen)
    options = dict(policy="h2o", budget=10, mode="stability", tau_mag=0.3, tau_dir=0.2, patience=1, block_pages=1)
    backend = scenario.backend("art", **options)
    backend.page_meta[0] = scenario.pool_metadata()
    # Stale state on the pages the steps will start: a page taken by a new request must start clean.
    starting = [scenario.loc_fn(r, n + 1) // PAGE for r, n in enumerate(prefix_lens)]
    backend.policy.mass[0, starting] = 5.0
    backend.policy.evicted[0, starting] = True
    library = get_policy("h2o", budget=10)
    for step in range(3):
        lens = tuple(n + step for n in prefix_lens)
        q = torch.randn(3, HQ, DIM, generator=gen)
        k, v = torch.randn(2, 3, HKV, DIM, generator=gen)
        out = scenario.decode(backend, q, k, v, graph=True, prefix_lens=lens)
        stats = backend.decode.last_stats
        expected = BatchARTDecodeWrapper(backend="triton")
        expected.plan(*scenario.page_table([n + 1 for n in lens]), HQ, HKV, DIM, PAGE,
                      termination=backend.termination, policy=library, request_ids=[0, 1, 2], chunk_pages=1 << 20)
        reference = expected.run(q, scenario.paged_pool(), page_meta=backend.page_meta[0])
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
        assert torch.equal(stats.visited_pages, expected.last_stats.visited_pages)
        nnz = int(expected.last_stats.selection.indptr[-1])
        assert torch.equal(stats.selection.pages[:nnz], expected.last_stats.selection.pages[:nnz])
        if step == 1:
            assert not bool(backend.policy.evicted[0, starting].any())
    assert bool((stats.selected_pages < stats.selected_pages.new_tensor([20, 4, 12])[:, None]).any())
    assert bool(backend.policy.evicted[0].any())  # pages were evicted for good


@pytest.mark.parametrize("hybrid", [False, True])
def test_snapkv_votes_at_prefill_match_the_library_policy(hybrid):
    """SnapKV's votes, taken in chunked prefill (own or the hybrid prefill backend's), drive graph decode."""
    chunks = ((200, 8, 100), (100, 40, 77))  # the second chunk holds the whole observation window
    lens = tuple(map(sum, zip(*chunks)))
    scenario = Scenario(prefix_lens=lens)
    options = dict(policy="snapkv", budget=6, mode="stability", tau_mag=0.3, tau_dir=0.2, patience=1,
                   block_pages=1)
    art = scenario.backend("art", **options)
    backend = HybridAttnBackend(scenario.runner, scenario.backend("triton"), art) if hybrid else art
    gen = torch.Generator().manual_seed(SEED + 6)
    queries, keys, prefix = [], [], (0, 0, 0)
    for chunk in chunks:
        n = sum(chunk)
        q, k, v = torch.randn(n, HQ * DIM, generator=gen), *torch.randn(2, n, HKV, DIM, generator=gen)
        batch = scenario.batch(ForwardMode.EXTEND, prefix_lens=prefix, extend_lens=chunk)
        with torch.no_grad():
            backend.init_forward_metadata(batch)
            backend.forward(q, k, v, scenario.layer, batch)
        queries.append(q.view(n, HQ, DIM).split(chunk))
        keys.append(k.split(chunk))
        prefix = tuple(map(sum, zip(prefix, chunk)))
    library = get_policy("snapkv", budget=6)
    for r in range(3):
        library.prefill(r, 0, torch.cat([queries[0][r], queries[1][r]]), torch.cat([keys[0][r], keys[1][r]]), PAGE)
    q = torch.randn(3, HQ, DIM, generator=gen)
    k, v = torch.randn(2, 3, HKV, DIM, generator=gen)
    out = scenario.decode(art, q, k, v, graph=True)
    stats = art.decode.last_stats
    expected = BatchARTDecodeWrapper(backend="triton")
    expected.plan(*scenario.page_table([n + 1 for n in lens]), HQ, HKV, DIM, PAGE, termination=art.termination,
                  policy=library, request_ids=[0, 1, 2], chunk_pages=1 << 20)
    reference = expected.run(q, scenario.paged_pool(), page_meta=art.page_meta[0])
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    nnz = int(expected.last_stats.selection.indptr[-1])
    assert torch.equal(stats.selection.pages[:nnz], expected.last_stats.selection.pages[:nnz])
    assert torch.equal(stats.visited_pages, expected.last_stats.visited_pages)
    assert int(stats.selected_pages.max()) == 6 < -(-lens[0] // PAGE)  # prompt pages were dropped


@pytest.mark.parametrize("tp_size, options", [
    (2, {"policy": "quest", "budget": 5, "mode": "stability", "tau_mag": 0.3, "tau_dir": 0.2, "patience": 1,
         "block_pages": 1}),
    (4, {"policy": "none", "mode": "off"}),  # 2 KV heads on 4 ranks: each KV head replicated on 2 ranks
])
def test_tensor_parallel_ranks_run_their_heads(tp_size, options, tmp_path):
    """Each rank's backend (SGLang's head split) gives the tp=1 output of its heads; stats per rank."""
    from sglang.srt.runtime_context import get_parallel

    from art_runtime.stats import StatsSubscriber

    gen = torch.Generator().manual_seed(SEED + 4)
    full = Scenario()
    k_pool, v_pool = full.fill_pool(gen)
    q = torch.randn(3, HQ, DIM, generator=gen)
    k, v = torch.randn(2, 3, HKV, DIM, generator=gen)
    whole = full.backend("art", **options)
    if whole.page_meta is not None:
        whole.page_meta[0] = full.pool_metadata()
    expected = full.decode(whole, q, k, v)
    expected_visits = whole.decode.last_stats.visited_pages
    assert bool((expected_visits < whole.decode.last_stats.selected_pages).any()) or options["mode"] == "off"

    address = f"ipc://{tmp_path}/art-stats"
    heads_per_rank, kv_ranks = HQ // tp_size, tp_size // min(tp_size, HKV)  # ranks sharing one KV head
    for rank in range(tp_size):
        with get_parallel().override(tp_size=tp_size, tp_rank=rank, attn_tp_size=tp_size, attn_tp_rank=rank,
                                     moe_tp_size=tp_size):
            scenario = Scenario(tp_size=tp_size)
            assert scenario.heads == (heads_per_rank, 1)
            kv_head = rank // kv_ranks
            k_rank, v_rank = scenario.paged_pool()
            k_rank.copy_(k_pool[..., kv_head: kv_head + 1, :])
            v_rank.copy_(v_pool[..., kv_head: kv_head + 1, :])
            backend = scenario.backend("art", **options, stats_address=address, stats_interval=1)
            assert (backend.num_head, backend.num_kv_head) == (heads_per_rank, 1)
            if backend.page_meta is not None:
                backend.page_meta[0] = scenario.pool_metadata()
            heads = slice(rank * heads_per_rank, (rank + 1) * heads_per_rank)
            out = scenario.decode(backend, q[:, heads].contiguous(), k[:, kv_head: kv_head + 1].contiguous(),
                                  v[:, kv_head: kv_head + 1].contiguous())
            torch.testing.assert_close(out, expected[:, heads], atol=1e-6, rtol=1e-6)
            if tp_size <= HKV:  # the whole GQA group on the rank: the same termination decisions
                assert torch.equal(backend.decode.last_stats.visited_pages, expected_visits[:, kv_head: kv_head + 1])
            # Stats: this rank's endpoint, messages named after it.
            telemetry = backend.telemetry
            assert (telemetry.rank, telemetry.rank_name) == (rank, f"tp{rank}")
            rank_address = address if rank == 0 else f"{address}.{rank}"
            with StatsSubscriber(rank_address) as sub:
                message = None
                deadline = time.monotonic() + 10
                while message is None or message.step < 0:
                    assert time.monotonic() < deadline, f"no stats from rank {rank}"
                    telemetry.step()  # read out (and, from the second call on, publish) every call
                    message = sub.recv(0.1)
            telemetry.close()
            assert message.request_ids == [f"tp{rank}"]
            assert len(message.visited_pages[0]) == 1  # this rank's one KV head


def check_metadata_current(scenario, meta, seq_lens):
    pool = scenario.runner.token_to_kv_pool
    cache = (pool.get_key_buffer(0).view(-1, PAGE, HKV, DIM), pool.get_value_buffer(0).view(-1, PAGE, HKV, DIM))
    kv_indptr, kv_indices, last = scenario.page_table(seq_lens)
    expected = PageMetadata.from_cache(cache, kv_indptr, kv_indices, last)
    pages = kv_indices.long()
    assert torch.equal(meta.key_scale[pages], expected.key_scale[pages])
    assert torch.equal(meta.key_min[pages].float(), expected.key_min[pages].float())
    assert torch.equal(meta.key_max[pages].float(), expected.key_max[pages].float())
    torch.testing.assert_close(meta.value_norm_max[pages], expected.value_norm_max[pages])


@pytest.mark.parametrize("hybrid", [False, True])
def test_metadata_current_after_extend_and_decode(hybrid):
    extend_lens = (37, 16, 50)  # a partial page, an exact page, a partial page
    scenario = Scenario(prefix_lens=extend_lens)
    art = scenario.backend("art", mode="bound")
    backend = HybridAttnBackend(scenario.runner, scenario.backend("triton"), art) if hybrid else art
    batch = scenario.batch(ForwardMode.EXTEND, prefix_lens=(0,) * 3, extend_lens=extend_lens)
    gen = torch.Generator().manual_seed(SEED + 2)
    n = sum(extend_lens)
    q, k, v = torch.randn(n, HQ * DIM, generator=gen), *torch.randn(2, n, HKV, DIM, generator=gen)
    with torch.no_grad():
        backend.init_forward_metadata(batch)
        backend.forward(q, k, v, scenario.layer, batch)
    check_metadata_current(scenario, art.page_meta[0], extend_lens)
    decode = scenario.batch()  # positions 37, 16 (a fresh page), 50
    q, k, v = torch.randn(3, HQ * DIM, generator=gen), *torch.randn(2, 3, HKV, DIM, generator=gen)
    with torch.no_grad():
        backend.init_forward_metadata(decode)
        backend.forward(q, k, v, scenario.layer, decode)
    check_metadata_current(scenario, art.page_meta[0], [n + 1 for n in extend_lens])


def test_page_table_from_sglang_metadata():
    scenario = Scenario()
    backend = scenario.backend("art")
    batch = scenario.batch()
    backend.init_forward_metadata(batch)
    seq_lens = [n + 1 for n in PREFIX_LENS]
    expected = scenario.page_table(seq_lens)
    kv_indptr, kv_indices, last = page_table(batch.seq_lens, backend.forward_metadata.kv_indptr,
                                             backend.forward_metadata.kv_indices, PAGE, int(expected[0][-1]) + 5)
    assert torch.equal(kv_indptr, expected[0]) and torch.equal(last, expected[2])
    assert torch.equal(kv_indices[: int(expected[0][-1])], expected[1])
    assert bool((kv_indices[int(expected[0][-1]):] == 0).all())


def test_telemetry_publishes_and_counts(tmp_path):
    zmq = pytest.importorskip("zmq")
    from art_runtime.stats import StatsSubscriber, StepStats

    address = f"ipc://{tmp_path}/art-stats"
    telemetry = DecodeTelemetry(num_layers=2, num_kv_heads=HKV, num_qo_heads=HQ, head_dim=DIM, element_size=4,
                                metadata_bytes_per_page=0, device="cpu", stats_address=address, stats_interval=1,
                                enable_metrics=True)
    counters = prometheus_counters()
    before = counters["visited"].labels(rank="tp0")._value.get()
    with StatsSubscriber(address) as sub:
        deadline = time.monotonic() + 5
        while sub.recv(0.05) is None:  # beat the PUB/SUB slow joiner
            assert time.monotonic() < deadline
            telemetry.publisher.publish(StepStats(-1, 0, [], [], [], [], [], 0))
        telemetry.set_batch(3, 2)  # the third row is graph padding
        visited = torch.tensor([[2, 3], [4, 5], [100, 100]])
        selected = torch.tensor([[6, 6], [7, 7], [1, 1]])
        telemetry.record(1, visited, selected, visited * PAGE, torch.tensor([90, 100, 1]))
        telemetry.step()  # snapshot
        telemetry.step()  # publish the snapshot
        messages = {}
        while len(messages) < 2:
            msg = sub.recv(5)
            assert msg is not None
            if msg.step >= 0:
                messages[msg.layer] = msg
    telemetry.close()
    assert messages[1].visited_pages == [[6, 8]] and messages[1].selected_pages == [[13, 13]]
    assert messages[1].kv_bytes_read == 14 * PAGE * 2 * DIM * 4
    assert messages[1].dense_kv_bytes == 190 * HKV * 2 * DIM * 4
    assert messages[0].visited_pages == [[0, 0]]
    assert counters["visited"].labels(rank="tp0")._value.get() - before == 14
