"""The dashboard notebooks run top to bottom in a fresh kernel (nbclient, CPU, no server), and
their figures hold what the stream carried and what the analysis computes.

Each test executes the committed notebook unchanged plus one probe cell at the end, in the same
kernel, that prints the figures' data and what the replay published as JSON; the assertions
run here, against numbers computed independently (the capture's own tensor shapes, page counts
from first principles, ``art_runtime.analysis.analyze_capture``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from safetensors import safe_open

from art_runtime.analysis import analyze_capture
from art_runtime.dashboards import capture_path
from art_runtime.policies import DensePolicy
from art_runtime.termination import TerminationConfig

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def run_notebook(name: str, probe: str) -> tuple[nbformat.NotebookNode, dict]:
    """Execute ``dashboards/<name>`` and then ``probe``; the notebook and the probe's JSON."""
    nb = nbformat.read(DASHBOARDS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(DASHBOARDS)}}
                   ).execute(env=notebook_env())  # raises on any cell error
    text = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.output_type == "stream")
    return nb, json.loads(text.strip().splitlines()[-1])


def notebook_env() -> dict:
    """The environment a user's kernel has: without the Triton interpreter that conftest turns on
    for the kernel tests (on a CPU, Quest scoring then takes its torch path, as for a user)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def capture_shape(path) -> tuple[list[int], int]:
    """Layers and KV heads of a capture, read from its tensors."""
    with safe_open(str(path), framework="pt") as f:
        layers = sorted(int(k[1:-2]) for k in f.keys() if k.endswith(".k"))
        return layers, f.get_slice(f"L{layers[0]}.k").get_shape()[0]


def shows_widgets(nb) -> bool:
    return any(WIDGET_VIEW in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


LIVE_PROBE = """
import json
hm = dash.heatmap.data[0]
print(json.dumps({
    "z": hm.z, "x": hm.x, "y": hm.y, "customdata": hm.customdata, "histogram": list(dash.histogram.data[0].x),
    "bytes_steps": list(dash.bytes_figure.data[0].x), "bytes_saved_mib": list(dash.bytes_figure.data[0].y),
    "requests": {axis: list(getattr(dash.request_figure.data[0], axis)) for axis in ("x", "y", "z")},
    "received": dash.state.messages, "sent": replay.streamer.publisher.sent, "stagger": replay.replay.stagger,
    "n_tokens": int(replay.replay.info["n_tokens"]), "captured": replay.replay.num_captured,
    "records": [r.to_dict() for r in replay.records.values()],
}))
"""


def test_live_notebook_shows_the_replayed_stream():
    nb, got = run_notebook("live.ipynb", LIVE_PROBE)
    assert shows_widgets(nb)
    layers, num_kv = capture_shape(capture_path())
    records = {(r["step"], r["layer"]): r for r in got["records"]}
    steps = sorted({step for step, _ in records})
    assert {layer for _, layer in records} == set(layers) and len(records) == len(steps) * len(layers)
    assert got["sent"] == len(records) and 0 < got["received"] <= got["sent"]

    # The heatmap is layers x KV heads of the capture.
    assert got["y"] == [f"L{layer}" for layer in layers] and got["x"] == [f"kv{h}" for h in range(num_kv)]
    assert [len(row) for row in got["z"]] == [num_kv] * len(layers)

    # Every cell is the pooled depth of the message of the step its row shows (hover data), as published.
    histogram = []
    for row, layer, custom in zip(got["z"], layers, got["customdata"]):
        step = custom[0][3]
        rec = records[(step, layer)]
        for h in range(num_kv):
            visited = sum(v[h] for v in rec["visited_pages"])
            selected = sum(s[h] for s in rec["selected_pages"])
            assert row[h] == pytest.approx(visited / selected, rel=1e-12)
            assert got["customdata"][layers.index(layer)][h][:2] == [visited, selected]
        histogram += [v / s for vr, sr in zip(rec["visited_pages"], rec["selected_pages"]) for v, s in zip(vr, sr)]
        # The dense policy selects every page of each request's prefix (first principles), and ART
        # stopped early somewhere: a dashboard showing constants would fail here.
        for r, sr in enumerate(rec["selected_pages"]):
            tokens = got["n_tokens"] - got["captured"] + r * got["stagger"] + step + 1
            assert sr == [math.ceil(tokens / 16)] * num_kv
    assert sorted(got["histogram"]) == pytest.approx(sorted(histogram))
    assert min(min(row) for row in got["z"]) < 0.9

    # KV bytes saved per step: every layer's dense minus read bytes, as published.
    assert got["bytes_steps"], "no step reached the bytes figure"
    for step, saved in zip(got["bytes_steps"], got["bytes_saved_mib"]):
        expected = sum(records[(step, layer)]["dense_kv_bytes"] - records[(step, layer)]["kv_bytes_read"]
                       for layer in layers if (step, layer) in records)
        assert saved == pytest.approx(expected / 2**20) and saved > 0
    # Per request: mean depth over layers and KV heads at each step, as published.
    requests = got["requests"]
    assert requests["y"] == [f"req-{r}" for r in range(4)] and requests["x"] == got["bytes_steps"]
    for r, row in enumerate(requests["z"]):
        for step, depth in zip(requests["x"], row):
            expected = [v / s for layer in layers for v, s in zip(records[(step, layer)]["visited_pages"][r],
                                                                   records[(step, layer)]["selected_pages"][r])]
            assert depth == pytest.approx(sum(expected) / len(expected))


EXPLORE_PROBE = """
import json
def figures():
    hm, curve = explore.heatmap.data[0], explore.curve.data
    return {"z": hm.z, "x": hm.x, "y": hm.y, "curve_x": list(curve[0].x), "curve_y": list(curve[0].y),
            "err_output": explore.result.err_output, "status": explore.status.value}
before = figures()
explore.controls["mode"].value = "off"
off = figures()
explore.controls["mode"].value = "stability"
explore.controls["tau_mag"].value = 1e-2
explore.controls["tau_dir"].value = 1e-4
after = figures()
print(json.dumps({"before": before, "off": off, "after": after, "layers": list(model.layers),
                  "queries": model.num_queries}))
"""


def analysis_depths(layers, queries, config):
    """Per layer, per KV head: pooled depth from ``analyze_capture`` (in the order explore's dense policy visits),
    and the per (query, query head) errors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small per-page ops: 5-10x faster than contended threads on a busy 2-core machine
    order = DensePolicy().for_mode(config.mode).order
    try:
        report = analyze_capture(capture_path(), layers=layers, queries=queries, orders=[order], settings=[config],
                                 progress=False)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for layer in layers:
        result = report.criteria[[c.layer for c in report.criteria].index(layer)]
        selected = report.hindsight_of(layer, order).pages_selected
        visited = result.visited_pages
        out[layer] = ([sum(v[h] for v in visited) / sum(selected) for h in range(len(visited[0]))],
                      result.head_err_output)
    return out


def flat(rows) -> list[float]:
    return [x for row in rows for x in row]


def test_explore_notebook_recomputes_when_controls_move(monkeypatch):
    nb, got = run_notebook("explore.ipynb", EXPLORE_PROBE)
    assert shows_widgets(nb)
    layers, num_kv = capture_shape(capture_path())
    assert got["layers"] == layers
    for fig in (got["before"], got["off"], got["after"]):
        assert fig["y"] == [f"L{layer}" for layer in layers] and fig["x"] == [f"kv{h}" for h in range(num_kv)]
        assert [len(row) for row in fig["z"]] == [num_kv] * len(layers)

    # Off reads every page: depth 1 and exact attention (fp32 against float64).
    assert got["off"]["z"] == [[1.0] * num_kv] * len(layers)
    assert max(e for layer in got["off"]["err_output"] for q in layer for e in q) < 1e-4

    # The other two settings match the analysis of the same capture, queries and setting (the
    # order's key-box scores on their torch path, as in the notebook, rather than the Triton interpreter).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for fig, config in ((got["before"], TerminationConfig()),
                        (got["after"], TerminationConfig(mode="stability", tau_mag=1e-2, tau_dir=1e-4))):
        expected = analysis_depths(layers, got["queries"], config)
        for i, layer in enumerate(layers):
            depth, head_err = expected[layer]
            assert fig["z"][i] == pytest.approx(depth, rel=1e-12)
            assert flat(fig["err_output"][i]) == pytest.approx(flat(head_err), rel=1e-6, abs=1e-9)
    assert got["after"]["z"] != got["before"]["z"] and got["after"]["curve_x"] != got["before"]["curve_x"]
    assert min(min(row) for row in got["after"]["z"]) < 0.5  # the looser thresholds stop early
    assert len(got["before"]["curve_x"]) == 5 and len(got["off"]["curve_x"]) == 1
