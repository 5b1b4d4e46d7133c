"""``art_runtime.analysis`` and ``art-runtime analyze`` on a tiny synthetic capture.

The capture is written by the test in the format of ``data/captures/README.md`` (fp16
safetensors, ``L{L}.k``/``L{L}.v`` ``[H_kv, n, D]``, ``L{L}.q_last`` ``[H_q, Q, D]``), from
fresh (seeded) random data: a few pages per KV head hold keys aligned with the group's
queries (a peaked head, layer 3) or weakly aligned ones (a diffuse head, layer 7), the rest
is noise; values have a common offset so that ``|o|`` is not tiny.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from art_runtime.analysis import (
    DEFAULT_SETTINGS,
    analyze_capture,
    build_batch,
    load_capture_layers,
    parse_setting,
)
from art_runtime.cli import main
from art_runtime import PageMetadata
from art_runtime.page_metadata import key_box_scale, quantize_key_box

PAGE = 16
N_TOKENS = 520  # 33 pages, the last one partial for every query
LAYERS = {3: 8.0, 7: 4.0}  # layer -> how strongly the heavy keys align with the queries
NUM_KV, GROUP, DIM, NUM_QUERIES = 2, 2, 16, 6
SETTINGS = [
    "off",
    "stability:tau=1e-3,p=2",
    "stability:tau=1e-2,p=1,block=1",
    "bound:eps=0.1,rel=output",
    "bound:eps=0.05,rel=values",
    "bound:eps=0.2,rel=values,block=1",
    "mass:eps=0.05,block=1",
]
OFF_TOLERANCE = 1e-5  # fp32 accumulation against float64
ROUNDING = 1e-5  # the bound's guarantee holds up to the rounding mode off has too


def write_capture(path, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, scale in LAYERS.items():
        u = torch.randn(NUM_KV, 1, DIM, generator=g)
        u = u / u.norm(dim=-1, keepdim=True)
        keys = 0.5 * torch.randn(NUM_KV, N_TOKENS, DIM, generator=g)
        heavy = torch.zeros(NUM_KV, N_TOKENS, dtype=torch.bool)
        for h in range(NUM_KV):
            pages = [0, *(torch.randperm(N_TOKENS // PAGE - 1, generator=g)[:3] + 1).tolist()]
            for p in pages:
                heavy[h, p * PAGE:(p + 1) * PAGE] = torch.rand(PAGE, generator=g) < 0.5
        strength = scale * torch.rand(NUM_KV, N_TOKENS, 1, generator=g)
        keys = torch.where(heavy[..., None], keys + strength * u, keys)
        values = torch.randn(NUM_KV, N_TOKENS, DIM, generator=g) + torch.randn(NUM_KV, 1, DIM, generator=g)
        queries = scale * u.repeat_interleave(GROUP, 0) + 0.5 * torch.randn(NUM_KV * GROUP, NUM_QUERIES, DIM, generator=g)
        tensors.update({f"L{layer}.k": keys.half(), f"L{layer}.v": values.half(), f"L{layer}.q_last": queries.half()})
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"model": "synthetic", "text": "random", "n_tokens": str(N_TOKENS),
                                            "scaling": str(1 / math.sqrt(DIM))})
    return path


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return write_capture(tmp_path_factory.mktemp("capture") / "synthetic.safetensors")


@pytest.fixture(scope="module")
def report(capture):
    return analyze_capture(capture, queries=None, settings=SETTINGS, progress=False)


def test_report_covers_every_layer_order_and_setting(report):
    assert report.layers == sorted(LAYERS) and report.orders == ["recency", "quest", "mass", "best"]
    assert len(report.criteria) == len(LAYERS) * 4 * len(SETTINGS)
    assert len(report.hindsight) == len(LAYERS) * 4 and len(report.overshoot) == len(LAYERS)
    assert report.queries == list(range(NUM_QUERIES))
    for r in report.criteria:
        assert torch.tensor(r.depth).shape == (NUM_QUERIES, NUM_KV)
        assert torch.tensor(r.head_err_output).shape == (NUM_QUERIES, NUM_KV * GROUP)


BOX_BYTES = 2 * DIM + 4  # fp8 key min and max + the fp32 scale, per (page, KV head)


def test_off_is_exact_and_reads_everything(report):
    for r in report.criteria:
        if r.config["mode"] != "off":
            continue
        assert r.pages_read == r.pages_selected and r.pages_fraction == 1.0
        # No metadata, whatever the order: mode off plans a dense policy without its order.
        assert r.kv_bytes == r.dense_bytes and r.metadata_bytes == 0
        assert r.err_output["max"] < OFF_TOLERANCE and r.err_values["max"] < OFF_TOLERANCE
        assert all(d == 1.0 for row in r.depth for d in row)


def test_bound_never_exceeds_its_eps_and_counts_metadata(report):
    stopped_early = False
    meta_bytes = BOX_BYTES + 4  # the key box and the fp32 value norm
    for r in report.criteria:
        # These orders score every key box (mode off plans without the order: test above).
        boxes = r.pages_selected * BOX_BYTES if r.order in ("quest", "mass") and r.config["mode"] != "off" else 0
        if r.config["mode"] == "mass":  # the key boxes only: the estimate reads no value norm
            assert r.metadata_bytes == r.pages_selected * BOX_BYTES + boxes
            continue
        if r.config["mode"] != "bound":
            assert r.metadata_bytes == boxes
            continue
        err = r.err_output if r.config["relative_to"] == "output" else r.err_values
        assert err["max"] <= r.config["eps"] + ROUNDING, (r.layer, r.order, r.setting)
        assert r.violations == 0
        assert 0 <= r.sketch_pages <= r.pages_selected
        # a byte a key dimension and token, an int8 step exponent a dim, the fp8 box minimum and
        # fp32 scale again (the grid's base is the box's)
        sketch_bytes = PAGE * DIM + DIM + DIM + 4
        assert r.metadata_bytes == r.pages_selected * meta_bytes + boxes + r.sketch_pages * sketch_bytes
        stopped_early |= r.pages_read < r.pages_selected
    assert stopped_early, "no bound setting stopped early: the guarantee was not exercised"


def test_stability_stops_early(report):
    assert any(r.pages_fraction < 0.5 for r in report.criteria if r.config["mode"] == "stability")


def test_mass_stops_early_in_its_own_order(report):
    # Only that it stops: this capture's heavy pages hold two far-apart clusters of keys, which
    # the estimate (keys spread around the box centre) underrates by design; its quality on
    # real attention is checked on a real capture below.
    for layer in report.layers:
        r = next(c for c in report.criteria if c.layer == layer and c.order == "mass" and c.config["mode"] == "mass")
        assert r.pages_fraction < 1.0


REAL_CAPTURE = Path(__file__).resolve().parents[2] / "shared/data/captures/smollm2-135m_pride-prejudice_8k.safetensors"


def test_mass_errs_on_the_order_of_eps_on_real_attention():
    """SmolLM2-135M on Pride and Prejudice (``../shared/data/captures``): the estimated error
    tracks the real one (measured with 8 queries at eps 0.05: mean 0.4 eps, max 1.2-1.6 eps;
    the former share-only rule erred up to 4 eps there)."""
    if not REAL_CAPTURE.exists():
        pytest.fail(f"the shared real capture is missing: {REAL_CAPTURE}")
    report = analyze_capture(REAL_CAPTURE, queries=4, orders=["mass"], settings=["mass:eps=0.05"], progress=False)
    for r in report.criteria:
        assert r.pages_fraction < 0.5, (r.layer, r.pages_fraction)
        assert r.err_output["mean"] <= 0.05 and r.err_output["max"] <= 2.5 * 0.05, (r.layer, r.err_output)


def test_best_order_never_needs_more_pages_than_another_order(report):
    # Checked on each layer's totals. The mass order is not optimal by construction: reading k
    # pages errs by (unread mass / read mass) * |o - mean of the unread values|, and another
    # order can leave pages whose values happen to average to o. On peaked heads mass decides;
    # on diffuse heads at tight targets luck can beat it (over 40 seeds of this capture: 2
    # seeds, layer 7 at 1% only), so there only the loose target is checked.
    for layer in report.layers:
        best = report.hindsight_of(layer, "best")
        targets = report.targets if LAYERS[layer] >= 8 else [max(report.targets)]
        for order in ("recency", "quest", "mass"):
            other = report.hindsight_of(layer, order)
            for rel in ("output", "values"):
                for target in targets:
                    assert best.fraction(target, rel) <= other.fraction(target, rel), (layer, order, rel, target)
                    assert best.fraction(target, rel, per_head=True) <= other.fraction(target, rel, per_head=True)
            for rel in ("output", "values"):
                for target in report.targets:  # a group needs at least what its hardest head needs
                    assert other.fraction(target, rel) >= other.fraction(target, rel, per_head=True)


def _direct_error(keys, values, q, tokens, scaling):
    """float64 attention of q [G, D] over the tokens listed, and over all ``keys``: |o_sub - o|."""
    def attend(k, v):
        p = torch.softmax(q @ k.T * scaling, -1)
        return p @ v
    full = attend(keys, values)
    return (attend(keys[tokens], values[tokens]) - full).norm(dim=-1) / full.norm(dim=-1)


def test_hindsight_matches_direct_attention(report, capture):
    """The hindsight count k: k pages in the order are within target for the whole group, k-1 are not."""
    target = 0.1
    for data in load_capture_layers(capture):
        batch = build_batch(data.keys, data.values, data.queries, data.n_tokens, None, PAGE)
        for b in (0, NUM_QUERIES - 1):
            n = batch.lengths[b]
            pages = math.ceil(n / PAGE)
            for h in range(NUM_KV):
                keys, values = data.keys[h, :n].double(), data.values[h, :n].double()
                q = batch.q[b, h * GROUP:(h + 1) * GROUP].double()
                p = torch.softmax(q @ keys.T * data.scaling, -1)  # [G, n]
                mass = torch.nn.functional.pad(p, (0, pages * PAGE - n)).view(GROUP, pages, PAGE).sum((0, 2))
                orders = {"recency": [0, *range(pages - 1, 0, -1)],
                          "best": torch.sort(mass, descending=True, stable=True).indices.tolist()}
                for order, visit in orders.items():
                    k = report.hindsight_of(data.layer, order).pages["output"][f"{target:g}"][b][h]

                    def error(count):
                        tokens = torch.cat([torch.arange(j * PAGE, min((j + 1) * PAGE, n)) for j in visit[:count]])
                        return _direct_error(keys, values, q, tokens, data.scaling).max()
                    assert error(k) <= target
                    if k > 1:
                        assert error(k - 1) > target


def test_overshoot_is_never_negative(report):
    for o in report.overshoot:
        lengths = [N_TOKENS - NUM_QUERIES + i + 1 for i in range(NUM_QUERIES)]
        assert o.count == sum(math.ceil(n / PAGE) for n in lengths) * NUM_KV * GROUP  # every (query, head, page)
        assert o.min >= -1e-9  # float64 rounding only
        assert 0 <= o.median <= o.p90 <= o.max


def test_each_request_has_its_own_last_page(capture):
    data = next(load_capture_layers(capture))
    batch = build_batch(data.keys, data.values, data.queries, data.n_tokens, None, PAGE)
    meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
    for b, n in enumerate(batch.lengths):
        last = int(batch.kv_indices[int(batch.kv_indptr[b + 1]) - 1])
        first = (math.ceil(n / PAGE) - 1) * PAGE
        lo, hi = data.keys[:, first:n].float().amin(1), data.keys[:, first:n].float().amax(1)  # [H_kv, D]
        scale = key_box_scale(torch.maximum(lo.abs(), hi.abs()).amax(-1))
        assert torch.equal(meta.key_scale[last], scale)
        for stored, expected in zip((meta.key_min[last], meta.key_max[last]), quantize_key_box(lo, hi, scale)):
            assert torch.equal(stored.float(), expected.float())
    assert len(set(batch.kv_indices.tolist())) == batch.cache.shape[0]  # every page listed, none wasted


def test_cli_writes_table_json_and_plots(capture, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["analyze", str(capture), "--queries", "3", "--out-dir", str(out), "--no-progress",
                   "--orders", "recency,best", "--setting", "off", "--setting", "bound:eps=0.1,rel=values",
                   "--targets", "0.01,0.05"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "hindsight optimum" in printed and "bound overshoot" in printed and "bound eps=0.1 values" in printed
    data = json.loads((out / "analysis.json").read_text())
    (rep,) = data["reports"]
    assert rep["queries"] == [0, 2, 5] and rep["orders"] == ["recency", "best"] and rep["targets"] == [0.01, 0.05]
    assert {r["setting"] for r in rep["criteria"]} == {"off", "bound eps=0.1 values"}
    assert set(rep["hindsight"][0]["fraction"]["output"]) == {"0.01", "0.05"}
    for name in ("synthetic_pages_vs_error.png", "synthetic_depth.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_bad_setting(capture, tmp_path, capsys):
    assert main(["analyze", str(capture), "--setting", "bound:epsilon=0.1", "--out-dir", str(tmp_path)]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.safetensors"), "--out-dir", str(tmp_path)]) == 2


def test_analyze_help_exits_0_and_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--layers", "--queries", "--all-queries", "--page-size", "--orders", "--setting", "--block-pages",
                   "--targets", "--out-dir", "--json", "--no-plots", "--no-progress"):
        assert option in text
    for word in ("hindsight", "overshoot", "recency", "quest", "best", "relative_to"):
        assert word in text


def test_parse_setting():
    s = parse_setting("stability:tau=1e-3,p=3")
    assert (s.config.tau_mag, s.config.tau_dir, s.config.patience) == (1e-3, 1e-3 ** 2, 3)
    assert s.name == "stability tau=1e-3 p=3"
    s = parse_setting("bound:eps=0.05,rel=values", block_pages=1)
    assert (s.config.mode, s.config.eps, s.config.relative_to, s.config.block_pages) == ("bound", 0.05, "values", 1)
    assert parse_setting("off:block=2", block_pages=1).config.block_pages == 2
    for spec in DEFAULT_SETTINGS:
        parse_setting(spec)
    for bad in ("", "fast", "bound:eps", "bound:eps=x", "bound:epsilon=1", "bound:relative_to=nothing",
                "stability:patience=0"):
        with pytest.raises(ValueError):
            parse_setting(bad)
