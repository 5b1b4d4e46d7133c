"""art_runtime.dashboards without a notebook: the live state, the live view on a real stream,
pause, explore mode, the decode-loop streamer and the capture replay (loopback only)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from art_runtime.dashboards import (
    CAPTURES_DIR, CaptureReplay, DecodeStatsStreamer, ExploreDashboard, ExploreModel, LiveDashboard, LiveState,
    capture_path, start_replay,
)
from art_runtime.dashboards.explore import budget_applies, explore_policies, make_policy
from art_runtime.dashboards.live import FIGURES
from art_runtime.policies import REGISTRY, DensePolicy, H2OPolicy
from art_runtime.stats import StatsPublisher, StatsSubscriber, StepStats
from art_runtime.termination import TerminationConfig

WAIT_S = 5.0


def message(step, layer, visited, selected, *, ids=("a", "b"), read=100, dense=400) -> StepStats:
    return StepStats(step=step, layer=layer, request_ids=list(ids), visited_pages=visited, selected_pages=selected,
                     visited_tokens=[[16 * v for v in row] for row in visited],
                     stable_at=[[0] * (2 * len(row)) for row in visited], kv_bytes_read=read, dense_kv_bytes=dense)


# -- LiveState ------------------------------------------------------------------------------------

def test_state_pools_latest_step_per_layer_and_filters():
    state = LiveState()
    state.add(message(0, 3, [[1, 2], [3, 4]], [[4, 4], [4, 8]]))
    state.add(message(1, 3, [[2, 2], [1, 8]], [[4, 4], [4, 8]]))
    state.add(message(1, 7, [[4, 1], [4, 1]], [[4, 4], [4, 4]], dense=None))
    state.add(message(0, 7, [[0, 0], [0, 0]], [[4, 4], [4, 4]]))  # late, older: the heatmap keeps step 1
    state.add(message(0, 7, [[0, 0], [0, 0]], [[4, 4], [4, 4]]))  # a repeat replaces, never double counts

    snap = state.snapshot()
    assert snap.layers == [3, 7] and snap.heads == [0, 1] and snap.layer_steps == [1, 1]
    assert snap.depth == [[3 / 8, 10 / 12], [8 / 8, 2 / 8]]
    assert snap.visited == [[3, 10], [8, 2]] and snap.selected == [[8, 12], [8, 8]]
    assert sorted(snap.histogram) == sorted([0.5, 0.5, 0.25, 1.0, 1.0, 0.25, 1.0, 0.25])
    # Bytes: summed over the layers of a step; a step with a message without a dense count has no "saved".
    assert snap.steps == [0, 1] and snap.bytes_read == [200, 200] and snap.bytes_saved == [600, None]
    assert snap.messages == 5 and state.request_ids == ["a", "b"]

    one = state.snapshot(request="b", layers=[7], heads=[1])
    assert one.layers == [7] and one.heads == [1] and one.depth == [[1 / 4]] and one.histogram == [0.25]
    assert one.request_depth == {"b": ([0, 1], [0.0, 0.25])}
    assert state.snapshot(request="nobody").depth == [[pytest.approx(float("nan"), nan_ok=True)] * 2] * 2


def test_state_forgets_steps_beyond_history():
    state = LiveState(history=3)
    for step in range(10):
        state.add(message(step, 0, [[1, 1]], [[2, 2]], ids=("a",)))
    snap = state.snapshot()
    assert snap.steps == [7, 8, 9] and snap.request_depth["a"][0] == [7, 8, 9] and snap.messages == 10


@pytest.mark.parametrize("history", [0, -1, 1.5])
def test_state_rejects_bad_history(history):
    with pytest.raises(ValueError, match="history"):
        LiveState(history)


# -- LiveDashboard on a real stream -------------------------------------------------------------

def wait_until(predicate, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def z(dash: LiveDashboard) -> list:
    """The heatmap's z as lists (plotly hands back tuples of whatever it was given)."""
    return [list(row) for row in dash.heatmap.data[0].z]


def join(pub: StatsPublisher, dash: LiveDashboard) -> None:
    """Publish warm-ups (step -1) until the dashboard's subscriber gets one (PUB/SUB slow joiner)."""
    deadline = time.monotonic() + WAIT_S
    while dash.state.messages == 0:
        if time.monotonic() > deadline:
            pytest.fail("the dashboard never received a message")
        pub.publish(message(-1, 0, [[0, 0], [0, 0]], [[1, 1], [1, 1]]))
        time.sleep(0.05)


def test_live_dashboard_follows_the_stream_and_pauses():
    with StatsPublisher("tcp://127.0.0.1:*") as pub:
        dash = LiveDashboard(pub.address, refresh_s=0.05)
        try:
            join(pub, dash)
            pub.publish(message(0, 0, [[1, 2], [3, 4]], [[4, 4], [4, 4]]))
            wait_until(lambda: z(dash) == [[1 / 2, 3 / 4]], "the heatmap to show step 0")
            assert dash.heatmap.data[0].y == ("L0",) and dash.heatmap.data[0].x == ("kv0", "kv1")
            assert list(dash.heatmap.data[0].customdata[0][1]) == [6, 8, "all requests", 0]
            assert list(dash.request.options) == ["all requests", "a", "b"]

            dash.pause.value = True
            seen = dash.state.messages
            pub.publish(message(1, 0, [[4, 4], [4, 4]], [[4, 4], [4, 4]]))
            wait_until(lambda: dash.state.messages > seen, "the paused dashboard to receive")
            time.sleep(0.2)  # four refresh periods: a running dashboard would have re-rendered
            assert z(dash) == [[1 / 2, 3 / 4]]
            dash.pause.value = False  # resuming renders at once
            assert z(dash) == [[1.0, 1.0]]

            dash.request.value = "a"
            assert list(dash.heatmap.data[0].customdata[0][0][:3]) == [4, 4, "request a"]
        finally:
            dash.close()


class BrowserView:
    """What a plotly figure's browser view sends the kernel: its first drawing and then every
    edit it applies, acknowledged with the edit's id (``_js2py_traceDeltas``). ``frozen``: the
    view of an anywidget model that missed its 2 s to load (see ``ViewWatch``), which draws the
    state the page loaded with and then applies no edit."""

    def __init__(self, fig, frozen: bool = False):
        self.fig, self.frozen, self.applied = fig, frozen, []
        fig.observe(self._on_edit, names=["_py2js_update", "_py2js_restyle"])
        self._acknowledge(fig._last_trace_edit_id)

    def _on_edit(self, change):
        if change["new"] is not None and not self.frozen:
            self.applied.append(change["new"]["trace_edit_id"])
            self._acknowledge(change["new"]["trace_edit_id"])

    def _acknowledge(self, edit_id):
        self.fig.set_state({"_js2py_traceDeltas": {"trace_deltas": [], "trace_edit_id": edit_id}})


def test_live_dashboard_rebuilds_a_figure_whose_view_froze():
    with StatsPublisher("tcp://127.0.0.1:*") as pub:
        dash = LiveDashboard(pub.address, refresh_s=0.05, view_timeout_s=0.5)
        try:
            join(pub, dash)
            figures = {name: getattr(dash, name) for name in FIGURES}
            views = {name: BrowserView(fig, frozen=name == "bytes_figure") for name, fig in figures.items()}
            for step in range(40):
                pub.publish(message(step, 0, [[1 + step % 3, 2], [3, 4]], [[4, 4], [4, 4]], read=100 + step))
                time.sleep(0.05)
            wait_until(lambda: dash.state.messages > 40 and dash.views_rebuilt == 1, "the frozen figure rebuilt")
            time.sleep(1.0)  # twice the timeout: the views that applied every edit are left alone
        finally:
            dash.close()
    assert dash.views_rebuilt == 1
    assert all(getattr(dash, name) is fig for name, fig in figures.items() if name != "bytes_figure")
    assert all(len(view.applied) > 5 for name, view in views.items() if name != "bytes_figure")
    new, old = dash.bytes_figure, figures["bytes_figure"]
    assert new is not old and old.comm is None and new.comm is not None  # a new browser model, the old one closed
    assert dash.widget.children[2].children == (new, dash.request_figure)  # in the frozen one's place
    snap = dash.snapshot()
    assert list(new.data[0].x) == snap.steps and snap.steps[-1] == 39  # with everything received
    assert list(new.data[1].y) == pytest.approx([b / (1 << 20) for b in snap.bytes_read])


@pytest.mark.parametrize("kwargs, name", [(dict(address=5557), "address"), (dict(refresh_s=0), "refresh_s"),
                                          (dict(view_timeout_s=0), "view_timeout_s")])
def test_live_dashboard_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LiveDashboard(**{"start": False, **kwargs})


# -- the decode-loop streamer -------------------------------------------------------------------

class FakeStats:
    """The DecodeStats fields the stream reads."""

    def __init__(self, visited, selected):
        self.visited_pages = torch.tensor(visited, dtype=torch.int32)
        self.selected_pages = torch.tensor(selected, dtype=torch.int32)
        self.visited_tokens = self.visited_pages * 16
        self.stable_at = torch.zeros(len(visited), 2 * len(visited[0]), dtype=torch.int32)
        self.kv_bytes_read = torch.tensor(1000, dtype=torch.int64)


def test_streamer_publishes_layers_with_the_dense_byte_count():
    with DecodeStatsStreamer("tcp://127.0.0.1:*") as streamer, StatsSubscriber(streamer.address) as sub:
        deadline = time.monotonic() + WAIT_S
        streamer.begin_step(-1, [1], num_kv_heads=1, head_dim=1, element_size=1)
        while sub.recv(0.05) is None:  # warm-ups until connected
            assert time.monotonic() < deadline, "subscriber never connected"
            streamer.publish_layer(0, FakeStats([[1]], [[1]]))
        streamer.begin_step(5, [100, 37], num_kv_heads=2, head_dim=64, element_size=2, request_ids=["x", "y"])
        assert streamer.publish_layer(3, FakeStats([[1, 2], [3, 1]], [[7, 7], [3, 3]]))
        msg = next(m for m in sub.iter(WAIT_S) if m.step == 5)
    assert (msg.layer, msg.request_ids, msg.visited_pages, msg.kv_bytes_read) == (3, ["x", "y"], [[1, 2], [3, 1]], 1000)
    assert msg.dense_kv_bytes == 137 * 2 * 2 * 64 * 2  # tokens x KV heads x (K, V) x head_dim x bytes


def test_streamer_rejects_misuse():
    with DecodeStatsStreamer("tcp://127.0.0.1:*") as streamer:
        with pytest.raises(ValueError, match="begin_step"):
            streamer.publish_layer(0, FakeStats([[1]], [[1]]))
        with pytest.raises(ValueError, match="request_ids"):
            streamer.begin_step(0, [1, 2], num_kv_heads=1, head_dim=1, element_size=1, request_ids=["a"])
        with pytest.raises(ValueError, match="step"):
            streamer.begin_step(1.0, [1], num_kv_heads=1, head_dim=1, element_size=1)
    with pytest.raises(ValueError, match="not loopback"):
        DecodeStatsStreamer("tcp://0.0.0.0:*")


# -- captures, replay, explore ------------------------------------------------------------------

def test_capture_path_finds_the_shared_captures_and_says_where_it_looked(tmp_path):
    assert capture_path() == CAPTURES_DIR / "smollm2-135m_pride-prejudice_8k.safetensors"
    assert capture_path("qwen2.5-0.5b_emma_16k.safetensors").is_file()
    with pytest.raises(ValueError, match=str(CAPTURES_DIR)):
        capture_path("missing.safetensors")
    with pytest.raises(ValueError, match="capture"):
        capture_path(tmp_path / "missing.safetensors")


def test_capture_replay_steps_are_staggered_growing_requests():
    replay = CaptureReplay(num_requests=2, stagger=10, layers=[25], termination=TerminationConfig(mode="off"))
    assert replay.num_steps == 64 - 10 and replay.rows(0) == [0, 10] and replay.rows(53) == [53, 63]
    assert replay.seq_lens(1) == [8192 - 64 + 2, 8192 - 64 + 12]
    (item,) = list(replay.run_step(1))
    # off reads every page: ceil(tokens / 16)
    assert item.layer == 25 and item.stats.visited_pages.tolist() == [[math.ceil(n / 16)] * 3 for n in replay.seq_lens(1)]
    for kwargs, name in [(dict(num_requests=65), "num_requests"), (dict(policy=H2OPolicy()), "policy"),
                         (dict(termination="off"), "termination"), (dict(stagger=0), "stagger")]:
        with pytest.raises(ValueError, match=name):
            CaptureReplay(layers=[25], **kwargs)
    with pytest.raises(ValueError, match="step"):
        replay.rows(54)
    with pytest.raises(ValueError, match="interval_s"):
        start_replay(interval_s=-1)


def test_repeating_replay_keeps_counting_steps_and_records_the_last_pass():
    replay = start_replay(layers=[25], num_requests=2, stagger=31, interval_s=0.0, repeat=True,
                          termination=TerminationConfig(mode="off"), policy=DensePolicy(order="recency"))
    try:
        steps = replay.replay.num_steps
        # Not `(steps + 3, 25) in records`: records keep one pass, and at full speed that key
        # can come and go between two polls.
        wait_until(lambda: replay.steps_published >= steps + 4 or replay.error, "a second pass", timeout_s=120)
    finally:
        replay.stop()
    assert replay.error is None and steps == 64 - 31
    keys = list(replay.records)
    assert len(keys) == steps and keys[-1][0] - keys[0][0] == steps - 1 and keys[-1][0] >= steps + 3
    first_pass = CaptureReplay(layers=[25], num_requests=2, stagger=31, termination=TerminationConfig(mode="off"),
                               policy=DensePolicy(order="recency"))
    step = keys[-1][0]
    (item,) = first_pass.run_step(step % steps)  # the second pass replays the first
    assert replay.records[(step, 25)].visited_pages == item.stats.visited_pages.tolist()


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the torch backend's small per-page ops: threads only contend on 2 busy cores
    yield ExploreModel(layers=[15], queries=2)
    torch.set_num_threads(threads)


def test_explore_policies_and_budgets(model):
    assert "dense" in explore_policies() and not any(REGISTRY[p].stateful for p in explore_policies())
    assert set(explore_policies()) | {"snapkv", "h2o"} == set(REGISTRY)
    off = TerminationConfig(mode="off")
    dense = model.run(off)
    assert dense.depth == [[1.0] * 3] and dense.pages_fraction == 1.0 and float(dense.errors().max()) < 1e-4
    for policy in ("quest", "streaming_llm"):
        assert budget_applies(policy)
        budgeted = model.run(off, policy, budget=32)
        assert budgeted.selected == [[2 * 32] * 3] and budgeted.pages_read == 2 * 32 * 3
        assert float(budgeted.errors().max()) > 1e-3  # what the policy dropped shows as error
    assert not budget_applies("dense") and model.run(off, "dense", budget=3) is dense  # cached, budget ignored
    with pytest.raises(ValueError, match="policy"):
        make_policy("h2o", 32)
    with pytest.raises(ValueError, match="config"):
        model.run("off")


def test_explore_sweep_scales_the_mode_thresholds(model):
    base = TerminationConfig(mode="stability", tau_mag=1e-3, tau_dir=1e-6)
    sweep = model.sweep(base, scales=(0.1, 1.0, 10.0))
    assert [r.config.tau_mag for r in sweep] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert [r.config.tau_dir for r in sweep] == pytest.approx([1e-8, 1e-6, 1e-4])
    assert sweep[1] is model.run(base)
    assert sweep[0].pages_read >= sweep[1].pages_read >= sweep[2].pages_read
    assert sweep[2].pages_read < sweep[0].pages_read  # looser thresholds stop earlier on this capture
    bound = model.sweep(TerminationConfig(mode="bound", eps=0.05), scales=(1.0, 2.0))
    assert [r.config.eps for r in bound] == pytest.approx([0.05, 0.1])
    assert len(model.sweep(TerminationConfig(mode="off"))) == 1


def test_explore_dashboard_rebuilds_a_figure_whose_view_froze(model):
    dash = ExploreDashboard(model, TerminationConfig(mode="off"), view_timeout_s=0.3)
    heatmap, curve = dash.heatmap, dash.curve
    views = [BrowserView(heatmap), BrowserView(curve, frozen=True)]
    dash.controls["mode"].value = "bound"  # an edit that the frozen view never applies
    assert dash.views_rebuilt == 0 and views[0].applied
    time.sleep(0.4)
    dash.controls["eps"].value = 0.1  # the next recompute finds the curve stale and rebuilds it first
    assert dash.views_rebuilt == 1 and dash.heatmap is heatmap and dash.curve is not curve and curve.comm is None
    assert dash.widget.children[2].children == (heatmap, dash.curve)
    sweep = model.sweep(dash.config(), "dense", dash.controls["budget"].value)
    assert list(dash.curve.data[0].x) == pytest.approx([100 * r.pages_fraction for r in sweep])
    assert dash.curve.data[2].x[0] == pytest.approx(100 * dash.result.pages_fraction)


def test_explore_dashboard_controls_set_what_is_computed(model):
    dash = ExploreDashboard(model, TerminationConfig(mode="off"))
    controls = dash.controls
    controls["policy"].value = "quest"
    assert not controls["budget"].disabled
    controls["budget"].value = 8
    controls["min_pages"].value = 4
    controls["patience"].value = 3
    controls["tau_mag"].value = 1e-2
    controls["mode"].value = "stability"
    result = dash.result
    assert (result.policy, result.budget) == ("quest", 8)
    assert (result.config.mode, result.config.patience, result.config.min_pages) == ("stability", 3, 4)
    assert result.config.tau_mag == pytest.approx(1e-2)
    assert result is model.run(dash.config(), "quest", 8)  # the figures show the controls' setting
    assert [list(row) for row in dash.heatmap.data[0].z] == result.depth
    assert result.selected == [[2 * 8] * len(result.selected[0])]  # quest keeps the budget's 8 pages per query
    controls["policy"].value = "dense"
    assert controls["budget"].disabled and dash.result.policy == "dense"
