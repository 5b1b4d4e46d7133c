"""The SGLang plugin with the real ``sglang`` package: entry point, CLI, options, launcher.

Needs ``sglang`` installed (``pip install --no-deps sglang==0.5.23`` plus its light deps, see
``.ci/run``); skipped otherwise.
"""

from __future__ import annotations

import json
import multiprocessing
from importlib.metadata import entry_points

import pytest

from sglang_support import child_resolve_options, import_sglang

registry = import_sglang()

from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402

from art_runtime.integrations.sglang import launch_server  # noqa: E402
from art_runtime.integrations.sglang.options import ARTOptions, resolve_options, split_argv  # noqa: E402

MODEL = ["--model-path", "dummy/model"]  # parsing never opens the model


@pytest.fixture(autouse=True)
def clean_art_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("ART_"):
            monkeypatch.delenv(key)


def test_entry_point_registers_the_backend_and_the_cli_choice():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "art"]
    assert ep.value == "art_runtime.integrations.sglang:register"
    assert ep.dist.name == "art-runtime"
    load_plugins()
    from art_runtime.integrations.sglang import create_art_backend

    assert registry.ATTENTION_BACKENDS["art"] is create_art_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    assert ATTENTION_BACKEND_CHOICES.count("art") == 1


def test_server_args_parse_art_and_the_hybrid_form():
    load_plugins()
    args = prepare_server_args(MODEL + ["--attention-backend", "art", "--page-size", "16"])
    assert (args.attention_backend, args.page_size) == ("art", 16)
    args = prepare_server_args(MODEL + ["--prefill-attention-backend", "flashinfer",
                                        "--decode-attention-backend", "art", "--page-size", "16"])
    assert (args.prefill_attention_backend, args.decode_attention_backend) == ("flashinfer", "art")


def test_parsing_refuses_page_size_one_and_bad_options(monkeypatch):
    load_plugins()
    with pytest.raises(ValueError, match="--page-size 16"):
        prepare_server_args(MODEL + ["--attention-backend", "art"])
    monkeypatch.setenv("ART_EPS", "-0.5")
    with pytest.raises(ValueError, match="--art-eps / ART_EPS"):
        prepare_server_args(MODEL + ["--attention-backend", "art", "--page-size", "16"])
    # a server that does not use ART ignores ART's variables
    assert prepare_server_args(MODEL + ["--attention-backend", "triton"]).attention_backend == "triton"


def test_page_state_policies_need_the_radix_cache_off(monkeypatch):
    load_plugins()
    monkeypatch.setenv("ART_POLICY", "h2o")
    art = MODEL + ["--attention-backend", "art", "--page-size", "16"]
    with pytest.raises(ValueError, match="--art-policy h2o .* pass --disable-radix-cache"):
        prepare_server_args(art)
    assert prepare_server_args(art + ["--disable-radix-cache"]).disable_radix_cache
    monkeypatch.setenv("ART_POLICY", "snapkv")
    with pytest.raises(ValueError, match="drop --enable-mixed-chunk"):
        prepare_server_args(art + ["--disable-radix-cache", "--enable-mixed-chunk"])


@pytest.mark.parametrize("env, message", [
    ({"ART_MODE": "certain"}, "--art-mode / ART_MODE: mode must be one of"),
    ({"ART_TAU_MAG": "nan"}, "--art-tau-mag / ART_TAU_MAG .*finite"),
    ({"ART_PATIENCE": "0"}, "--art-patience / ART_PATIENCE: patience must be >= 1"),
    ({"ART_MIN_PAGES": "two"}, "--art-min-pages / ART_MIN_PAGES .*cannot parse 'two'"),
    ({"ART_RELATIVE_TO": "input"}, "--art-relative-to / ART_RELATIVE_TO"),
    ({"ART_POLICY": "lru"}, "--art-policy / ART_POLICY: must be one of"),
    ({"ART_POLICY": "h2o", "ART_BUDGET": "8"}, "recent_pages \\(8\\) must be below budget"),
    ({"ART_POLICY": "quest", "ART_BUDGET": "1"}, "--art-budget / ART_BUDGET with --art-policy quest"),
    ({"ART_BUDGET": "8"}, "policy 'none' reads every page"),
    ({"ART_STATS_ADDRESS": "tcp://10.1.2.3:5557"}, "--art-stats-address / ART_STATS_ADDRESS: .*not loopback"),
    ({"ART_STATS_INTERVAL": "0"}, "--art-stats-interval / ART_STATS_INTERVAL: must be >= 1"),
])
def test_invalid_values_name_the_option(env, message):
    with pytest.raises(ValueError, match=message):
        resolve_options(env)


def test_config_file_under_the_environment(tmp_path):
    config = tmp_path / "art.toml"
    config.write_text('mode = "bound"\neps = 0.2\nrelative-to = "values"\npolicy = "quest"\nbudget = 32\n')
    options = resolve_options({"ART_CONFIG": str(config), "ART_EPS": "0.1"})
    assert options == ARTOptions(mode="bound", eps=0.1, relative_to="values", policy="quest", budget=32)
    assert options.build_policy().budget == 32
    bad = tmp_path / "art.json"
    bad.write_text(json.dumps({"epsilon": 0.1}))
    with pytest.raises(ValueError, match="unknown ART option 'epsilon'"):
        resolve_options({"ART_CONFIG": str(bad)})


def test_launcher_strips_validates_and_exports(monkeypatch):
    art_env, rest = split_argv(MODEL + ["--art-mode", "bound", "--attention-backend", "art", "--art-eps=0.25",
                                        "--page-size", "16"])
    assert art_env == {"ART_MODE": "bound", "ART_EPS": "0.25"}
    assert rest == MODEL + ["--attention-backend", "art", "--page-size", "16"]
    with pytest.raises(ValueError, match="unknown ART option '--art-epsilon'"):
        split_argv(MODEL + ["--art-epsilon", "0.1"])

    args = launch_server.prepare(MODEL + ["--attention-backend", "art", "--page-size", "16", "--art-mode", "bound",
                                          "--art-eps", "0.25"])
    assert args.attention_backend == "art"
    assert resolve_options() == ARTOptions(mode="bound", eps=0.25)  # exported for the scheduler processes
    with pytest.raises(ValueError, match="--art-eps / ART_EPS"):
        launch_server.prepare(MODEL + ["--attention-backend", "art", "--page-size", "16", "--art-eps", "-1"])
    with pytest.raises(ValueError, match="does not use ART"):
        launch_server.prepare(MODEL + ["--attention-backend", "triton", "--art-mode", "off"])
    with pytest.raises(SystemExit, match="art-sglang: .*--art-patience"):
        launch_server.main(MODEL + ["--attention-backend", "art", "--page-size", "16", "--art-patience", "x"])


def test_options_reach_a_spawned_process(monkeypatch):
    """SGLang spawns its schedulers; they inherit the environment the launcher wrote."""
    art_env, _ = split_argv(["--art-mode", "bound", "--art-eps", "0.125", "--art-policy", "quest",
                             "--art-budget", "24"])
    for key, value in art_env.items():
        monkeypatch.setenv(key, value)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=child_resolve_options, args=(queue,))
    child.start()
    registered, options = queue.get(timeout=240)
    child.join(60)
    assert child.exitcode == 0
    assert registered
    assert options == ARTOptions(mode="bound", eps=0.125, policy="quest", budget=24)
