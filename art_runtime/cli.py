"""The ``art-runtime`` command line (also ``python -m art_runtime``).

Commands:

``demo``
    ART decode on a built-in synthetic workload or a real attention capture, per termination
    mode: how deep each head read, bytes saved, output error, time per step
    (``art_runtime.demo``).
"""

from __future__ import annotations

import argparse
import sys

from .demo import DTYPES, DemoSettings, run_demo
from .termination import MODES, RELATIVE_TO

DEMO_DESCRIPTION = """\
Run ART decode (Attention Run-time Termination) on a batch of requests and compare the
termination modes against exact attention.

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
  art-runtime demo --modes off,bound --relative-to values --eps 0.01
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
    defaults = DemoSettings()
    demo = commands.add_parser("demo", help="run ART decode per termination mode on a demo workload",
                               description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = demo.add_argument_group("workload (the shape options are for the synthetic workload only)")
    shape.add_argument("--batch", type=positive_int,
                       help="requests in the batch (default: 4; with --capture, 65 - steps: one request per "
                            "captured query)")
    shape.add_argument("--kv-len", type=positive_int,
                       help="context tokens of the longest request before the first step; the others get "
                            "7/8 to all of it, so their last pages fill differently (default: 4096)")
    shape.add_argument("--page-size", type=positive_int, default=defaults.page_size,
                       help=f"tokens per KV page (default: {defaults.page_size})")
    shape.add_argument("--num-qo-heads", type=positive_int, help="query heads (default: 8)")
    shape.add_argument("--num-kv-heads", type=positive_int,
                       help="KV heads; the query heads sharing one (a GQA group) stop together (default: 2)")
    shape.add_argument("--head-dim", type=positive_int, help="head dimension (default: 64)")
    shape.add_argument("--steps", type=positive_int,
                       help="decode steps; each appends one token per request through "
                            "append_paged_kv_cache(..., page_meta=meta), exercising the metadata update, "
                            "then decodes (default: 4; with --capture, 1)")
    shape.add_argument("--seed", type=int, default=defaults.seed,
                       help=f"seed of the synthetic workload and of the page shuffle (default: {defaults.seed})")
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
    termination.add_argument("--modes", type=mode_list, default=defaults.modes,
                             help=f"comma-separated termination modes to run, of {', '.join(MODES)} "
                                  f"(default: {','.join(defaults.modes)}); off reads every page")
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
                                  f"says (default: {defaults.eps:g})")
    termination.add_argument("--relative-to", choices=RELATIVE_TO, default=defaults.relative_to,
                             help="bound: eps is relative to |o| (output) or to the value scale max|v| over the "
                                  f"selected pages (values) (default: {defaults.relative_to})")
    termination.add_argument("--min-pages", type=non_negative_int, default=defaults.min_pages,
                             help="every mode: visit-order positions always read, e.g. sink + current page "
                                  f"(default: {defaults.min_pages})")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> None:
    fields = DemoSettings.__dataclass_fields__
    run_demo(DemoSettings(**{name: value for name, value in vars(args).items() if name in fields}), sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    """The ``art-runtime`` argument parser with all its commands."""
    parser = argparse.ArgumentParser(
        prog="art-runtime", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ART (Attention Run-time Termination): paged decode attention that stops reading\n"
                    "a head's KV pages once more pages can no longer change its output.\n\n"
                    "Run 'art-runtime demo --help' for the demo's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    add_demo_parser(commands)
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
    try:
        args.handler(args)
    except ValueError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
