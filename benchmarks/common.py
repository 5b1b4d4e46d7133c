"""Helpers shared by the GPU benchmarks: device facts, timing, copy bandwidth, results files.

Everything here imports on a machine without a GPU; the functions that touch the device
need one.
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

L2_FLUSH_BYTES = 256 << 20
COPY_BUFFER_BYTES = 1 << 30


def device_info() -> dict:
    """Describe the current CUDA device and the software stack.

    Returns
    -------
    dict
        ``name``, ``slug`` (lower-case name for file names), compute ``capability``,
        ``sm_count``, ``l2_bytes``, ``memory_bytes`` and the ``python``, ``torch``,
        ``cuda`` (torch's CUDA version) and ``triton`` versions.
    """
    import triton

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "slug": re.sub(r"[^a-z0-9]+", "-", props.name.lower()).strip("-"),
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "l2_bytes": props.L2_cache_size,
        "memory_bytes": props.total_memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
    }


def utc_now() -> datetime.datetime:
    """Return the current time in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


class L2Flusher:
    """Evicts the GPU's L2 cache by reading a buffer several times its size.

    Reading (a sum) rather than writing (``zero_``) leaves only clean lines in L2, so the
    timed kernel that follows pays no write-back of the flush buffer.

    Parameters
    ----------
    nbytes : int
        Size of the buffer that is read; at least four times the L2 size is used.
    """

    def __init__(self, nbytes: int = L2_FLUSH_BYTES):
        l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        self.nbytes = max(nbytes, 4 * l2_bytes)
        self._buffer = torch.rand(self.nbytes // 4, dtype=torch.float32, device="cuda")

    def __call__(self) -> None:
        self._buffer.sum()


def as_cuda_graph(fn: Callable[[], object]) -> tuple[Callable[[], None], bool]:
    """Capture one call of ``fn`` in a CUDA graph; return its replay and whether that worked.

    Timing graph replays measures the GPU work alone, as a server that decodes under CUDA
    graphs (SGLang, vLLM) sees it, without Python launch overhead on either side.
    """
    fn()  # compile / JIT and warm the allocator outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return fn, False
    return graph.replay, True


# Untimed replays before every timing. The first ~35 replays after PageMetadata.from_cache
# ran 18% slower on an H100, for ART's graph and (in the policy runs) FlashInfer's alike:
# timed twice in a row, the same graph measured 3348 then 2822 µs (32/8/128, batch 64 / 32K);
# 5 s of idle or 2000 L2 flushes in between did not help, replaying it did. Cause not found
# (benchmarks/NOTES.md p12); with 5-10 warm-up replays it had made FlashInfer look 1.17x slower
# in policy runs and ART `off` 8-19% slower in decode runs that built metadata first.
WARMUP_REPLAYS = 50


def median_time_us(
    fn: Callable[[], object], iters: int, flush_l2: Callable[[], None], warmup: int = WARMUP_REPLAYS
) -> float:
    """Median GPU time of ``fn`` in microseconds, each call timed alone with CUDA events.

    Parameters
    ----------
    fn : callable
        The work to time; launches GPU work on the current stream.
    iters : int
        Number of timed calls.
    flush_l2 : callable
        Called before every timed call, outside the timed region.
    warmup : int
        Untimed calls made first (compilation, autotuning, allocator warm-up; ``WARMUP_REPLAYS``).

    Returns
    -------
    float
        The median over ``iters`` calls of the time between the events recorded just
        before and just after ``fn``.
    """
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        flush_l2()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def copy_bandwidth_tbps(nbytes: int = COPY_BUFFER_BYTES, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written.

    Parameters
    ----------
    nbytes : int
        Size of the copied buffer (1 GiB by default, far larger than L2).
    iters : int
        Number of timed copies; the median is used.

    Returns
    -------
    float
        ``2 * nbytes / median copy time``, in units of 1e12 bytes per second.
    """
    source = torch.randn(nbytes // 4, dtype=torch.float32, device="cuda")
    destination = torch.empty_like(source)
    time_us = median_time_us(
        lambda: destination.copy_(source), iters=iters, warmup=3, flush_l2=lambda: None
    )
    return 2 * nbytes / (time_us * 1e-6) / 1e12


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Format rows as a markdown table.

    Parameters
    ----------
    rows : sequence of dict
        One dict per table row.
    columns : sequence of (header, key, format spec)
        Which key of each row goes in which column, formatted with ``format(value, spec)``;
        a missing or ``None`` value prints as ``-``.

    Returns
    -------
    str
        The table, one line per row, with a header and separator line.
    """
    lines = [
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "|".join("---:" for _ in columns) + "|",
    ]
    for row in rows:
        cells = [
            "-" if row.get(key) is None else format(row[key], spec) for _, key, spec in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that ran: this process's when ``argv`` is None, else ``script`` with ``argv``."""
    return shlex.join(["python3", *sys.argv]) if argv is None else shlex.join([script, *argv])


def run_header(started: datetime.datetime, command: str, versions: dict, copy_tbps: float | None) -> list[str]:
    """The date, command, versions and copy-bandwidth lines that open a results file."""
    return [
        f"- date (UTC): {started.isoformat()}",
        f"- command: `{command}`",
        "- versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "-"),
        f"- copy bandwidth: {copy_tbps:.3f} TB/s (read + write)" if copy_tbps else "- copy bandwidth: not measured",
    ]


def write_results(out_dir: Path, stem: str, payload: dict, markdown: str) -> list[Path]:
    """Write ``<stem>.json`` (the payload) and ``<stem>.md`` into ``out_dir``.

    Returns
    -------
    list of Path
        The two files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    markdown_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    markdown_path.write_text(markdown + "\n")
    return [json_path, markdown_path]


def report(out_dir: Path, stem: str, payload: dict, markdown: str, failures: Sequence, what: str) -> int:
    """Write the results, print the table and where it went; exit status 1 (with ``what``) if any ``failures``."""
    paths = write_results(out_dir, stem, payload, markdown)
    print(markdown)
    print("wrote " + ", ".join(str(path) for path in paths))
    if failures:
        print(f"FAILED: {what} in {len(failures)} {'row' if len(failures) == 1 else 'rows'}", file=sys.stderr)
        return 1
    return 0
