"""``art-runtime eval``: configurations, aggregation, and one small real run on SmolLM2."""

import json
import math

import pytest
import torch

from art_runtime import TerminationConfig
from art_runtime.cli import main
from art_runtime.evaluation import _kl, build_configs, format_table, summarize


def test_configs_sweep_every_policy_and_setting():
    configs = build_configs(["dense", "quest"], ["stability", "bound"], tau_mags=[1e-3, 1e-4], epss=[0.05, 0.1],
                            relative_to=["values"], budget_fraction=0.25, context_tokens=2048, page_size=16)
    names = [c.name for c in configs]
    assert names == ["dense + stability tau=1e-3 p=2", "dense + stability tau=1e-4 p=2",
                     "dense + bound eps=0.05 values", "dense + bound eps=0.1 values", "quest(budget=32)",
                     "quest(budget=32) + stability tau=1e-3 p=2", "quest(budget=32) + stability tau=1e-4 p=2",
                     "quest(budget=32) + bound eps=0.05 values", "quest(budget=32) + bound eps=0.1 values"]
    assert configs[1].termination.tau_dir == pytest.approx(1e-8)  # the paper's tau_dir = tau_mag^2
    assert configs[4].make_policy().budget == 32
    with pytest.raises(ValueError, match="policies"):
        build_configs(["nope"], ["stability"])
    with pytest.raises(ValueError, match="mode"):  # a mode TerminationConfig does not know
        build_configs(["dense"], ["sometimes"])


def test_kl():
    logits = torch.randn(3, 50)
    assert _kl(logits, logits).abs().max() < 1e-12
    other = logits.clone()
    other[:, 0] += 3
    assert (_kl(logits, other) > 0).all()


def run(score, answer, nll=(), top1=(), kl=(), read=0, context=0):
    return {"score": score, "answer": answer, "nll": list(nll), "top1": list(top1), "kl": list(kl),
            "pages_read": read, "pages_context": context, "bytes_read": read * 10, "bytes_dense": context * 10}


def test_summary_aggregates_tasks_agreement_and_perplexity():
    report = {
        "configs": [{"name": "x"}],
        "tasks": [{"kind": "passkey", "length": 1024, "runs": {"dense": run(1.0, "1"), "x": run(1.0, "1", top1=[1, 1],
                                                                                                  kl=[0.0, 0.2], read=5, context=10)}},
                  {"kind": "single", "length": 2048, "runs": {"dense": run(1.0, "2"), "x": run(0.0, "3", top1=[1, 0],
                                                                                                 kl=[0.1, 0.5], read=3, context=10)}}],
        "perplexity": {"dense": run(None, None, nll=[1.0, 1.0]), "x": run(None, None, nll=[1.1, 1.1], top1=[1, 1],
                                                                              kl=[0.0, 0.0], read=2, context=10)},
        "capture": None,
    }
    summary = summarize(report)
    x = summary["x"]
    assert x["accuracy"] == {"passkey": 1.0, "single": 0.0} and x["accuracy_by_length"] == {"1024": 1.0, "2048": 0.0}
    assert x["same_answer_as_dense"] == 0.5
    assert x["top1_agreement"] == pytest.approx(5 / 6) and x["kl_max"] == 0.5
    assert x["pages_fraction"] == pytest.approx(10 / 30) and x["bytes_fraction"] == pytest.approx(10 / 30)
    assert x["perplexity_change"] == pytest.approx(math.exp(0.1) - 1)
    assert not x["same_score_as_dense"] and not x["meets_rule"]  # a wrong answer, and perplexity +10.5%
    assert summary["dense"]["pages_fraction"] == 1.0
    table = format_table({**report, "summary": summary})
    assert "| x | 33.3% |" in table and "+10.52% | no |" in table


def test_runs_merge_into_one_report(tmp_path):
    from art_runtime.evaluation import merge_reports, write_report

    def part(length, ppl, seconds):
        tasks = [{"kind": "passkey", "length": length, "runs": {"dense": run(1.0, "1"),
                                                                "x": run(1.0, "1", top1=[1], kl=[0.1], read=1, context=2)}}]
        perplexity = {"dense": run(None, None, nll=[1.0]), "x": run(None, None, nll=[1.2], top1=[1], kl=[0.0],
                                                                   read=1, context=1)} if ppl else None
        settings = {"model": "m", "kinds": ["passkey"], "lengths": [length], "samples": 1, "filler": "f",
                    "ppl_tokens": 1 if ppl else 0, "ppl_segments": 1, "ppl_text": "t", "ppl_context": 2}
        return {"command": f"art-runtime eval --lengths {length}", "settings": settings, "configs": [{"name": "x"}],
                "machine": {"platform": "p", "cpu_threads": 1, "torch": "t", "transformers": "t"}, "date": "d",
                "seconds": seconds, "tasks": tasks, "perplexity": perplexity, "capture": None}

    merged = merge_reports([part(1024, True, 60), part(2048, False, 120)])
    x = merged["summary"]["x"]
    assert x["accuracy_by_length"] == {"1024": 1.0, "2048": 1.0} and x["perplexity_change"] == pytest.approx(math.exp(0.2) - 1)
    assert x["pages_fraction"] == pytest.approx(3 / 5) and merged["seconds"] == 180
    write_report(merged, tmp_path, plots=False)
    text = (tmp_path / "eval.md").read_text()
    assert "`art-runtime eval --lengths 1024`" in text and "`art-runtime eval --lengths 2048`" in text
    with pytest.raises(ValueError, match="perplexity"):
        merge_reports([part(1024, True, 1), part(2048, True, 1)])
    other = part(2048, False, 1)
    other["configs"] = [{"name": "y"}]
    with pytest.raises(ValueError, match="configurations"):
        merge_reports([part(1024, True, 1), other])


@pytest.mark.slow
def test_eval_command_on_smollm2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU user's paths: torch backend and metadata update
    args = ["eval", "--lengths", "320", "--kinds", "passkey", "--samples", "1", "--ppl-context", "200",
            "--ppl-tokens", "2", "--policies", "dense", "--modes", "stability", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["command"] == "art-runtime " + " ".join(args)
    assert report["seconds"] > 0 and report["machine"]["torch"] == torch.__version__
    name = "dense + stability tau=1e-3 p=2"
    assert list(report["summary"]) == ["dense", name]
    task = report["tasks"][0]
    assert task["runs"]["dense"]["score"] == 1.0  # SmolLM2 finds a pass key in 320 tokens
    row = report["summary"][name]
    assert len(task["runs"][name]["kl"]) == 6 and len(report["perplexity"][name]["nll"]) == 2
    assert 0 < row["pages_fraction"] <= 1 and 0 <= row["top1_agreement"] <= 1 and row["kl_mean"] >= 0
    assert row["perplexity"] > 1
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000 and (tmp_path / "accuracy.png").exists()
    assert "| config | pages read |" in capsys.readouterr().out


def test_settings_are_checked():
    from art_runtime.evaluation import EvalSettings, _check_settings

    _check_settings(EvalSettings(ppl_tokens=0))  # 0: no perplexity
    for bad, name in ((dict(ppl_tokens=-1), "ppl_tokens"), (dict(samples=0), "samples"),
                      (dict(lengths=(100,)), "lengths"), (dict(kinds=("haystack",)), "kinds")):
        with pytest.raises(ValueError, match=name):
            _check_settings(EvalSettings(**bad))


def test_configs_sweep_patience_and_relative_to():
    configs = build_configs(["dense"], ["stability", "bound", "mass"], tau_mags=[1e-3], patience=[2, 4],
                            epss=[0.05], relative_to=["output", "values"])
    assert [c.name for c in configs] == [
        "dense + stability tau=1e-3 p=2", "dense + stability tau=1e-3 p=4", "dense + bound eps=0.05 output",
        "dense + bound eps=0.05 values", "dense + mass eps=0.05"]
    # whole settings in analyze's syntax, after the swept ones; a repeated one once
    configs = build_configs(["dense"], ["mass"], epss=[0.05], min_pages=3,
                            settings=["mass:eps=0.05", "bound:eps=0.5,rel=values", "stability:tau=1e-4,p=4,min=1"])
    assert [c.name for c in configs] == ["dense + mass eps=0.05 min=3", "dense + bound eps=0.5 values min=3",
                                         "dense + stability tau=1e-4 p=4 min=1"]
    with pytest.raises(ValueError, match="setting"):
        build_configs(["dense"], ["off"], settings=["mass:eps=lots"])


@pytest.mark.slow
def test_task_compares_with_dense_on_the_configurations_own_prefix(monkeypatch):
    """The reused dense logits (while a configuration follows dense's answer) and the dense
    cache that follows a configuration's own tokens give what a dense cache run in lockstep
    with the configuration gives, step for step; a batch gives each request what it gets
    alone (answers, KL, pages read)."""
    from art_runtime.evaluation import EvalConfig, Evaluator
    from art_runtime.integrations.transformers import load_model, model_forward
    from art_runtime.tasks import TaskBuilder, load_filler

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, tokenizer = load_model("smollm2", progress=False)
    # stability follows dense's answer; a 2-page window loses the pass key and departs from it
    configs = [EvalConfig("dense", (), TerminationConfig(mode="stability")),
               EvalConfig("streaming_llm", (("sink_pages", 1), ("window_pages", 1)))]
    evaluator = Evaluator(model, tokenizer, configs, prefill_chunk=128)  # several prefill chunks
    builder = TaskBuilder(tokenizer, load_filler("austen"))
    samples = [builder.build("passkey", 320, depth, seed=i) for i, depth in enumerate((0.25, 0.75))]
    runs = evaluator.run_tasks(samples, 6)  # one batch of two requests
    assert any(r[configs[1].name].answer != r["dense"].answer for r in runs)  # the second path is exercised
    for sample, sample_runs in zip(samples, runs):
        ids = torch.tensor([sample.input_ids])
        prefilled = evaluator._prefill(ids[:, :-1])  # alone, one request
        for config in configs:
            cache, dense = prefilled.clone(config.termination, policy=config.make_policy()), prefilled.dense_cache()
            token, kl, tokens = ids[:, -1:], [], []
            with torch.no_grad():
                for _ in range(6):
                    logits = model_forward(model, token, cache)[:, -1]
                    kl.append(float(_kl(model_forward(model, token, dense)[:, -1], logits)))
                    token = logits.argmax(-1, keepdim=True)
                    tokens.append(int(token))
            run = sample_runs[config.name]
            assert run.answer == tokenizer.decode(tokens)
            assert run.kl == pytest.approx(kl, rel=1e-3, abs=1e-7)  # batched vs alone: rounding only
            assert run.pages_read == int(cache.decode_record().visited_pages.sum())
