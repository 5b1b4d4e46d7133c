"""Which execution path runs: Triton (CUDA, or the Triton interpreter on CPU) or torch."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tensor_core_dots(q: torch.Tensor) -> bool:
    """Whether the Triton kernels dot ``q`` (and what they load with it) in 16 bits on tensor
    cores: 16-bit queries, off the interpreter, which computes bf16 dots wrongly (there, and
    for fp32 queries, they dot in fp32 with ``input_precision="ieee"``)."""
    return q.dtype != torch.float32 and not triton_interpreter_enabled()


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device`` in this process."""
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA and ``"torch"`` elsewhere; check the others."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_runs_on(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got device {device}"
        )
    return backend
