"""Paged decode attention: ART (``art_runtime``, Triton) against FlashInfer on one GPU.

For every (heads/head_dim shape, batch, kv_len) row this builds a bf16 paged KV cache of
random data with shuffled physical pages, times ART's ``BatchARTDecodeWrapper.run`` for
each requested termination mode and FlashInfer's tensor-core
``BatchDecodeWithPagedKVCacheWrapper.run`` in the same process, checks ART's output
against FlashInfer's, and writes a JSON and a markdown table of the results.

Run ``python benchmarks/bench_decode.py --help`` for the options; benchmarks/README.md
says how to run it on a GPU machine and what each column means.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import (
    COPY_BUFFER_BYTES,
    WARMUP_REPLAYS,
    L2Flusher,
    as_cuda_graph,
    copy_bandwidth_tbps,
    device_info,
    markdown_table,
    median_time_us,
    utc_now,
    write_results,
)

DEFAULT_SHAPES = ["32/8/128", "14/2/64"]
DEFAULT_BATCHES = [1, 4, 16, 64, 128]  # 1-4: split rows and their merge; 64-128: bandwidth
DEFAULT_KV_LENS = [4096, 16384, 32768]
DEFAULT_ITERS = 100
QUICK_BATCHES = [1, 16]
QUICK_KV_LENS = [4096]
QUICK_ITERS = 10
PAGE_SIZE = 16
DTYPE = torch.bfloat16
MAX_CACHE_FRACTION_OF_FREE = 0.4
MAX_RELATIVE_ERROR = 2e-2
FLASHINFER_WORKSPACE_BYTES = 256 << 20
MODES_NEEDING_PAGE_METADATA = {"bound", "mass"}

TABLE_COLUMNS = [
    ("heads q/kv/dim", "shape", "s"),
    ("batch", "batch", "d"),
    ("kv_len", "kv_len", "d"),
    ("ART mode", "mode", "s"),
    ("warps/stages/progs per SM/off tile", "launch", "s"),
    ("warps/stages run", "warps_stages_run", "s"),
    ("MB", "megabytes", ".1f"),
    ("floor µs", "floor_us", ".1f"),
    ("ART µs", "art_us", ".1f"),
    ("FI µs", "flashinfer_us", ".1f"),
    ("ART TB/s", "art_tbps", ".2f"),
    ("FI TB/s", "flashinfer_tbps", ".2f"),
    ("ART/copy", "art_fraction_of_copy", ".2f"),
    ("FI/copy", "flashinfer_fraction_of_copy", ".2f"),
    ("ART/FI", "art_over_flashinfer", ".3f"),
    ("visited", "visited_fraction", ".3f"),
    ("rel err", "max_relative_error", ".1e"),
]


@dataclass(frozen=True)
class DecodeShape:
    """Head counts and head size of one attention layer."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def parse(cls, text: str) -> DecodeShape:
        """Parse ``"HQO/HKV/D"``, e.g. ``"32/8/128"``."""
        try:
            num_qo_heads, num_kv_heads, head_dim = (int(part) for part in text.split("/"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"shape {text!r} is not HQO/HKV/D, e.g. 32/8/128"
            ) from None
        if num_qo_heads % num_kv_heads:
            raise argparse.ArgumentTypeError(f"shape {text!r}: HQO must be a multiple of HKV")
        return cls(num_qo_heads, num_kv_heads, head_dim)

    def __str__(self) -> str:
        return f"{self.num_qo_heads}/{self.num_kv_heads}/{self.head_dim}"


@dataclass
class DecodeInputs:
    """A random bf16 decode problem: queries, a paged KV cache and its CSR page table."""

    q: torch.Tensor
    paged_kv_cache: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor


def cache_bytes(shape: DecodeShape, batch: int, kv_len: int) -> int:
    """Bytes of the paged cache (K and V, whole pages) for ``batch`` requests of ``kv_len``."""
    pages = batch * -(-kv_len // PAGE_SIZE)
    return pages * 2 * PAGE_SIZE * shape.num_kv_heads * shape.head_dim * DTYPE.itemsize


def bytes_moved(shape: DecodeShape, batch: int, kv_len: int) -> int:
    """The fewest bytes one decode step must move: K and V of every token, q, and out."""
    kv = 2 * batch * kv_len * shape.num_kv_heads * shape.head_dim
    q_and_out = 2 * batch * shape.num_qo_heads * shape.head_dim
    return (kv + q_and_out) * DTYPE.itemsize


def make_inputs(shape: DecodeShape, batch: int, kv_len: int) -> DecodeInputs:
    """Random queries and cache (``randn``), every request ``kv_len`` tokens long, with
    the physical pages of all requests in a random order."""
    from art_runtime.paged_cache import allocate_paged_kv_cache

    pages_per_request = -(-kv_len // PAGE_SIZE)
    num_pages = batch * pages_per_request
    paged_kv_cache = allocate_paged_kv_cache(
        num_pages, PAGE_SIZE, shape.num_kv_heads, shape.head_dim,
        dtype=DTYPE, device="cuda", kv_layout="NHD",
    )
    paged_kv_cache.normal_()
    return DecodeInputs(
        q=torch.randn(batch, shape.num_qo_heads, shape.head_dim, dtype=DTYPE, device="cuda"),
        paged_kv_cache=paged_kv_cache,
        kv_indptr=torch.arange(
            0, num_pages + 1, pages_per_request, dtype=torch.int32, device="cuda"
        ),
        kv_indices=torch.randperm(num_pages, device="cuda").to(torch.int32),
        kv_last_page_len=torch.full(
            (batch,), kv_len - (pages_per_request - 1) * PAGE_SIZE,
            dtype=torch.int32, device="cuda",
        ),
    )


def max_relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest ``||out - ref|| / ||ref||`` over the (request, head) output vectors."""
    out, reference = out.float(), reference.float()
    return ((out - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` fills in the options that were not given."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + (
            " Times ART for each --modes value and FlashInfer's tensor-core decode on the "
            "same random bf16 cache (page size 16, shuffled pages, L2 flushed before every "
            "timed call), measures the device-to-device copy bandwidth once, and writes "
            "decode_<device>_<date>.json/.md into --out-dir."
        ),
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
        help="folder for the JSON and markdown results (default benchmarks/results)",
    )
    parser.add_argument(
        "--shapes", nargs="+", type=DecodeShape.parse, default=None, metavar="HQO/HKV/D",
        help=f"layer shapes as HQO/HKV/HEAD_DIM (default {' '.join(DEFAULT_SHAPES)})",
    )
    parser.add_argument(
        "--batches", nargs="+", type=int, default=None, metavar="B",
        help=f"batch sizes (default {DEFAULT_BATCHES}; with --quick {QUICK_BATCHES})",
    )
    parser.add_argument(
        "--kv-lens", nargs="+", type=int, default=None, metavar="TOKENS",
        help=f"tokens per request (default {DEFAULT_KV_LENS}; with --quick {QUICK_KV_LENS})",
    )
    parser.add_argument(
        "--iters", type=int, default=None, metavar="N",
        help=f"timed calls per measurement, median reported "
        f"(default {DEFAULT_ITERS}; with --quick {QUICK_ITERS})",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["off"], choices=["off", "stability", "bound", "mass"],
        metavar="MODE",
        help="ART termination modes to time: off, stability, bound, mass (default off); "
        "'off' reads every page and must match FlashInfer within a relative error of 2e-2",
    )
    parser.add_argument(
        "--launch", nargs="+", default=None, metavar="WARPS/STAGES",
        help="ART decode kernel launch configurations to time, e.g. 4/2 8/3; 0 for either keeps "
        "art_runtime's own choice, which depends on the mode and head_dim (default: 0/0)",
    )
    parser.add_argument(
        "--programs-per-sm", nargs="+", type=int, default=None, metavar="N",
        help="split heuristic targets to try: work items per SM, for every mode (default: art_runtime's, "
             "which depends on the mode)",
    )
    parser.add_argument(
        "--off-block-tokens", nargs="+", type=int, default=None, metavar="TOKENS",
        help="tile lengths of mode off to try (default: art_runtime's)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: small batches and kv_len, few iterations, unless given explicitly",
    )
    args = parser.parse_args(argv)
    args.shapes = args.shapes or [DecodeShape.parse(text) for text in DEFAULT_SHAPES]
    args.batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    args.kv_lens = args.kv_lens or (QUICK_KV_LENS if args.quick else DEFAULT_KV_LENS)
    args.iters = args.iters or (QUICK_ITERS if args.quick else DEFAULT_ITERS)
    if args.launch is None:
        from art_runtime import decode as art_decode

        args.launch = [f"{art_decode.NUM_WARPS or 0}/{art_decode.NUM_STAGES or 0}"]
    # Warps or stages 0 keep art_runtime's own choice (they depend on the mode and head_dim).
    args.launch = [tuple(int(x) for x in text.split("/")) for text in args.launch]
    from art_runtime import decode as art_decode

    args.programs_per_sm = args.programs_per_sm or [0]  # 0: art_runtime's own choice
    args.off_block_tokens = args.off_block_tokens or [art_decode.OFF_BLOCK_TOKENS]
    # One kernel configuration: (warps, stages, programs per SM, off tile tokens).
    args.configs = list(itertools.product(args.launch, args.programs_per_sm, args.off_block_tokens))
    return args


def benchmark_row(
    shape: DecodeShape,
    batch: int,
    kv_len: int,
    modes: list[str],
    configs: list[tuple[tuple[int, int], int, int]],
    flashinfer_wrapper,
    iters: int,
    flush_l2: L2Flusher,
    copy_tbps: float,
) -> list[dict]:
    """Time FlashInfer once and ART once per mode on one random problem.

    Returns
    -------
    list of dict
        One result row per ART mode (FlashInfer's numbers repeated in each).
    """
    from art_runtime import BatchARTDecodeWrapper, TerminationConfig
    from art_runtime import decode as art_decode

    inputs = make_inputs(shape, batch, kv_len)
    page_table = (inputs.kv_indptr, inputs.kv_indices, inputs.kv_last_page_len)
    layer = (shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, PAGE_SIZE)

    flashinfer_wrapper.plan(*page_table, *layer, q_data_type=DTYPE, kv_data_type=DTYPE)
    run_flashinfer = functools.partial(flashinfer_wrapper.run, inputs.q, inputs.paged_kv_cache)
    flashinfer_out = run_flashinfer()
    replay_flashinfer, flashinfer_graph = as_cuda_graph(run_flashinfer)
    flashinfer_us = median_time_us(replay_flashinfer, iters, flush_l2)

    nbytes = bytes_moved(shape, batch, kv_len)
    floor_us = nbytes / (copy_tbps * 1e12) * 1e6
    rows = []
    own_programs_per_sm = (art_decode.PROGRAMS_PER_SM, art_decode.STABILITY_PROGRAMS_PER_SM,
                           art_decode.OFF_PROGRAMS_PER_SM)
    page_meta = None
    for mode, ((num_warps, num_stages), programs_per_sm, off_tokens) in itertools.product(modes, configs):
        if mode in MODES_NEEDING_PAGE_METADATA and page_meta is None:
            from art_runtime import PageMetadata

            page_meta = PageMetadata.from_cache(inputs.paged_kv_cache, *page_table, kv_layout="NHD")
        art_decode.NUM_WARPS, art_decode.NUM_STAGES = num_warps or None, num_stages or None
        art_decode.PROGRAMS_PER_SM = programs_per_sm or own_programs_per_sm[0]
        art_decode.STABILITY_PROGRAMS_PER_SM = programs_per_sm or own_programs_per_sm[1]
        art_decode.OFF_PROGRAMS_PER_SM = programs_per_sm or own_programs_per_sm[2]
        art_decode.OFF_BLOCK_TOKENS = off_tokens
        art = BatchARTDecodeWrapper(kv_layout="NHD", backend="triton")
        art.plan(*page_table, *layer, termination=TerminationConfig(mode=mode))
        run_art = functools.partial(
            art.run, inputs.q, inputs.paged_kv_cache,
            page_meta=page_meta if mode in MODES_NEEDING_PAGE_METADATA else None,
        )
        art_out = run_art()
        stats = art.last_stats
        # What the kernel ran with: a stage count whose tiles exceed SHARED_MEMORY_BUDGET is lowered.
        _, ran_warps, ran_stages = art._kernel_launch(art._plan, inputs.q.device, inputs.paged_kv_cache.element_size())
        replay_art, art_graph = as_cuda_graph(run_art)
        art_us = median_time_us(replay_art, iters, flush_l2)
        rows.append({
            "shape": str(shape),
            "num_qo_heads": shape.num_qo_heads,
            "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "batch": batch,
            "kv_len": kv_len,
            "mode": mode,
            "launch": f"{num_warps}/{num_stages}/{programs_per_sm}/{off_tokens}",
            "warps_stages_run": f"{ran_warps}/{ran_stages}",
            "cuda_graphs": f"{'yes' if art_graph else 'no'}/{'yes' if flashinfer_graph else 'no'}",
            "bytes": nbytes,
            "megabytes": nbytes / 1e6,
            "floor_us": floor_us,
            "art_us": art_us,
            "flashinfer_us": flashinfer_us,
            "art_tbps": nbytes / art_us / 1e6,
            "flashinfer_tbps": nbytes / flashinfer_us / 1e6,
            "art_fraction_of_copy": floor_us / art_us,
            "flashinfer_fraction_of_copy": floor_us / flashinfer_us,
            "art_over_flashinfer": flashinfer_us / art_us,
            "visited_fraction": (
                stats.visited_pages.sum() / stats.selected_pages.sum()
            ).item(),
            "max_relative_error": max_relative_error(art_out, flashinfer_out),
            "flashinfer_backend": getattr(flashinfer_wrapper, "resolved_backend", None),
        })
    (art_decode.PROGRAMS_PER_SM, art_decode.STABILITY_PROGRAMS_PER_SM,
     art_decode.OFF_PROGRAMS_PER_SM) = own_programs_per_sm
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the results; return the exit status."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    import flashinfer

    started = utc_now()
    device = device_info()
    versions = {key: device.pop(key) for key in ("python", "torch", "cuda", "triton")}
    versions["flashinfer"] = flashinfer.__version__
    copy_tbps = copy_bandwidth_tbps()
    flush_l2 = L2Flusher()
    flashinfer_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"),
        "NHD", use_tensor_cores=True,
    )
    print(f"{device['name']}: device-to-device copy {copy_tbps:.2f} TB/s (read + write)")

    rows, skipped, failures = [], [], []
    cases = list(itertools.product(args.shapes, args.batches, args.kv_lens))
    for shape, batch, kv_len in tqdm(cases, desc="decode rows", unit="row"):
        torch.cuda.empty_cache()
        free_bytes, _ = torch.cuda.mem_get_info()
        needed = cache_bytes(shape, batch, kv_len)
        if needed > MAX_CACHE_FRACTION_OF_FREE * free_bytes:
            reason = (f"cache {needed / 2**30:.1f} GiB > {MAX_CACHE_FRACTION_OF_FREE:.0%} "
                      f"of free {free_bytes / 2**30:.1f} GiB")
            skipped.append({"shape": str(shape), "batch": batch, "kv_len": kv_len,
                            "reason": reason})
            tqdm.write(f"skipped {shape} batch {batch} kv_len {kv_len}: {reason}")
            continue
        for row in benchmark_row(shape, batch, kv_len, args.modes, args.configs, flashinfer_wrapper,
                                 args.iters, flush_l2, copy_tbps):
            rows.append(row)
            # "not <=" so that a NaN error fails too
            if row["mode"] == "off" and not row["max_relative_error"] <= MAX_RELATIVE_ERROR:
                failures.append(row)
                tqdm.write(f"FAIL: ART (mode off) differs from FlashInfer on {shape} batch "
                           f"{batch} kv_len {kv_len}: max relative error "
                           f"{row['max_relative_error']:.3e} > {MAX_RELATIVE_ERROR}")

    command = shlex.join(["python3", *sys.argv])
    timing = (f"median of {args.iters} CUDA-graph replays (one decode call each, GPU time "
              f"without Python launch overhead, for ART and FlashInfer alike) after "
              f"{WARMUP_REPLAYS} warm-up replays, each timed alone with CUDA events, L2 flushed "
              f"before every replay by reading a {flush_l2.nbytes >> 20} MiB buffer")
    markdown = "\n".join([
        f"# Paged decode: ART vs FlashInfer on {device['name']}",
        "",
        f"- date (UTC): {started.isoformat()}",
        f"- command: `{command}`",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"- FLASHINFER_CUDA_ARCH_LIST: {os.environ.get('FLASHINFER_CUDA_ARCH_LIST')}",
        f"- device: {device['sm_count']} SMs, L2 {device['l2_bytes'] >> 20} MiB, "
        f"memory {device['memory_bytes'] / 2**30:.0f} GiB, capability {device['capability']}",
        f"- device-to-device copy bandwidth: {copy_tbps:.3f} TB/s (read + write, "
        f"{COPY_BUFFER_BYTES >> 20} MiB buffer)",
        f"- bf16, page size {PAGE_SIZE}, random data, shuffled physical pages; "
        f"FlashInfer BatchDecodeWithPagedKVCacheWrapper, NHD, use_tensor_cores=True",
        f"- timing: {timing}",
        "",
        markdown_table(rows, TABLE_COLUMNS),
        "",
        *(f"- skipped {s['shape']} batch {s['batch']} kv_len {s['kv_len']}: {s['reason']}"
          for s in skipped),
    ])
    payload = {
        "benchmark": "decode",
        "date": started.isoformat(),
        "command": command,
        "device": device,
        "versions": versions,
        "flashinfer_cuda_arch_list": os.environ.get("FLASHINFER_CUDA_ARCH_LIST"),
        "dtype": str(DTYPE).removeprefix("torch."),
        "page_size": PAGE_SIZE,
        "timing": timing,
        "copy_bandwidth_tbps": copy_tbps,
        "max_relative_error_allowed": MAX_RELATIVE_ERROR,
        "rows": rows,
        "skipped": skipped,
        "failures": failures,
    }
    stem = f"decode_{device['slug']}_{started.date().isoformat()}" + ("_quick" * args.quick)
    paths = write_results(args.out_dir, stem, payload, markdown)
    print(markdown)
    print("wrote " + ", ".join(str(path) for path in paths))
    if failures:
        print(f"FAILED: ART mode off differs from FlashInfer by more than {MAX_RELATIVE_ERROR} "
              f"(relative) in {len(failures)} of {len(rows)} rows; see 'rel err'",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
