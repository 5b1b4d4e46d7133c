"""The ``art-runtime demo`` command, run in-process, checked through its JSON report."""

import json
from pathlib import Path

import pytest

from art_runtime.cli import main

CAPTURE = Path(__file__).resolve().parents[2] / "shared/data/captures/smollm2-135m_pride-prejudice_8k.safetensors"
SMALL = ["--synthetic", "--batch", "2", "--kv-len", "1024", "--steps", "2", "--device", "cpu", "--backend", "torch",
         "--dtype", "float32"]
OPTIONS = ["--synthetic", "--model", "--tokens", "--depth", "--policy", "--plot", "--live", "--live-rounds", "--batch", "--kv-len", "--page-size", "--num-qo-heads", "--num-kv-heads", "--head-dim", "--dtype",
           "--device", "--backend", "--steps", "--modes", "--tau-mag", "--tau-dir", "--patience", "--eps",
           "--relative-to", "--min-pages", "--seed", "--capture", "--layer", "--json"]
# Float32 storage, float32 accumulation and output: mode off is exact up to rounding.
OFF_TOLERANCE = 1e-5


def run_demo(tmp_path, *args):
    path = tmp_path / "report.json"
    assert main(["demo", *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_off_reads_every_page_and_is_exact(tmp_path, capsys):
    report = run_demo(tmp_path, *SMALL, "--modes", "off")
    off = report["modes"]["off"]
    assert off["depth"]["visited_pages"] == off["depth"]["selected_pages"]
    assert off["bytes"]["read"] == off["bytes"]["dense"]
    assert off["error"]["relative_max"] < OFF_TOLERANCE
    assert off["error"]["value_relative_max"] < OFF_TOLERANCE
    assert "synthetic workload" in capsys.readouterr().out


# eps loose enough that bound stops early on some heads of the small workload, so that its
# guarantee is actually exercised.
@pytest.mark.parametrize("relative_to, eps", [("output", 0.1), ("values", 0.05)])
def test_stability_saves_pages_and_bound_keeps_its_guarantee(tmp_path, relative_to, eps):
    report = run_demo(tmp_path, *SMALL, "--relative-to", relative_to, "--eps", str(eps))
    off, stability, bound = (report["modes"][mode] for mode in ("off", "stability", "bound"))
    assert stability["depth"]["fraction_of_pages"] < off["depth"]["fraction_of_pages"] == 1.0
    assert bound["depth"]["fraction_min"] < 1.0
    certified = "relative_max" if relative_to == "output" else "value_relative_max"
    assert bound["error"][certified] <= eps + OFF_TOLERANCE
    assert bound["metadata_matches_rebuild"] is True


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in OPTIONS)
    assert "synthetic" in text.lower()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--kv-len", "64", "--capture", "x.safetensors"], ["--layer", "3"],
                                  ["--batch", "2"], ["--synthetic", "--layer", "3"],
                                  ["--device", "cpu", "--capture", "/nonexistent.safetensors"]])
def test_unusable_arguments_exit_with_2(args, capsys):
    assert main(["demo", *args]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(not CAPTURE.exists(), reason=f"capture file not found: {CAPTURE}")
def test_capture(tmp_path, capsys):
    report = run_demo(tmp_path, "--capture", str(CAPTURE), "--batch", "3", "--device", "cpu", "--backend", "torch",
                      "--dtype", "float32", "--relative-to", "values")
    workload = report["workload"]
    assert workload["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (workload["num_qo_heads"], workload["num_kv_heads"], workload["head_dim"]) == (9, 3, 64)
    assert workload["context_lens"] == [8192 - 64, 8192 - 32, 8192 - 1]
    assert workload["physical_pages"] < workload["logical_pages"]  # the requests share their prefix pages
    off = report["modes"]["off"]
    assert off["depth"]["visited_pages"] == off["depth"]["selected_pages"]
    assert off["error"]["relative_max"] < OFF_TOLERANCE
    bound = report["modes"]["bound"]
    assert bound["error"]["value_relative_max"] <= bound["termination"]["eps"] + OFF_TOLERANCE
    assert bound["metadata_matches_rebuild"] is True
    assert "SmolLM2-135M-Instruct" in capsys.readouterr().out


@pytest.mark.slow
def test_default_demo_answers_a_passkey_with_art(tmp_path, capsys, monkeypatch):
    """The default demo: SmolLM2 answers a passkey with ART (stability, dense in Quest order) as dense does."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU user's paths: torch backend and metadata update
    report_path, plot = tmp_path / "passkey.json", tmp_path / "pages.png"
    assert main(["demo", "--json", str(report_path), "--plot", str(plot)]) == 0
    report = json.loads(report_path.read_text())
    assert report["dense"]["correct"] and report["passkey"] in report["dense"]["answer"]
    art = report["art"]["stability"]
    assert art["same_as_dense"] and art["correct"]
    assert 0 < art["pages_fraction"] < 1
    assert len(art["pages_per_layer_head"]) == 30 and all(len(row) == 3 for row in art["pages_per_layer_head"])
    assert plot.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "ART stability" in out and report["passkey"] in out and out.count("%") > 90


def test_live_demo_publishes_the_real_model_on_the_stats_stream(tmp_path, monkeypatch):
    """``demo --live``: every ART decode step of SmolLM2 reaches a subscriber, per layer and KV head."""
    import socket
    import threading

    from art_runtime.stats import StatsSubscriber

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    received, done = [], threading.Event()
    with StatsSubscriber(address) as subscriber:
        def listen():
            while True:
                message = subscriber.recv(timeout_s=1.0)
                if message is None and done.is_set():
                    return
                if message is not None:
                    received.append(message)
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        # Rounds keep the stream flowing past the subscriber's connection (PUB/SUB keeps no history).
        assert main(["demo", "--tokens", "600", "--plot", "", "--live", address, "--live-rounds", "3",
                     "--json", str(tmp_path / "live.json")]) == 0
        done.set()
        listener.join(timeout=30)
    assert received, "no message reached the subscriber"
    assert {m.layer for m in received} == set(range(30))  # SmolLM2: 30 layers
    for m in received:
        assert len(m.visited_pages) == 1 and len(m.visited_pages[0]) == 3  # one request, 3 KV heads
        assert all(0 < v <= s for v, s in zip(m.visited_pages[0], m.selected_pages[0]))
        assert m.selected_pages[0][0] in (38, 39)  # ceil((600 + step) / 16) pages of context
