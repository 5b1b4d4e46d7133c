"""ART in SGLang: the attention backend ``art``, loaded as an SGLang plugin.

``pip install "art-runtime[sglang]"`` registers :func:`register` under SGLang's entry-point
group ``sglang.srt.plugins``; SGLang's ``load_plugins()`` calls it in the launcher and in
every scheduler process it spawns, so ``--attention-backend art`` and
``--prefill-attention-backend X --decode-attention-backend art`` work everywhere. Options:
:mod:`~art_runtime.integrations.sglang.options`; launcher:
``python -m art_runtime.integrations.sglang.launch_server`` (``art-sglang``).

This module imports nothing of SGLang at import time; :func:`register` does.
"""

from __future__ import annotations

import inspect
import math

BACKEND_NAME = "art"
STATE_PER_PAGE = ("snapkv", "h2o")  # policies whose per-request state is kept per KV page
# SGLang's KV bytes per token, from which it sizes the pool (ART adds its own: _count_art_memory).
POOL_CELL_SIZE = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"


def uses_art(server_args) -> bool:
    """Whether a parsed ``ServerArgs`` selects the ART backend for any phase."""
    return BACKEND_NAME in (getattr(server_args, "attention_backend", None),
                            getattr(server_args, "decode_attention_backend", None),
                            getattr(server_args, "prefill_attention_backend", None))


def validate_server_args(server_args) -> None:
    """Launch-time checks of a server that uses ART: the options and the page size.

    Raises
    ------
    ValueError
        Naming the flag to change, before any model is loaded.
    """
    from .options import resolve_options

    if not uses_art(server_args):
        return
    options = resolve_options()
    if options.policy in STATE_PER_PAGE and not getattr(server_args, "disable_radix_cache", False):
        raise ValueError(f"--art-policy {options.policy} keeps its state per KV page, and the radix cache shares "
                         "pages between requests: pass --disable-radix-cache")
    if options.policy == "snapkv" and getattr(server_args, "enable_mixed_chunk", False):
        raise ValueError("--art-policy snapkv votes at prefill and cannot tell a mixed batch's decode tokens from "
                         "a prompt chunk: drop --enable-mixed-chunk")
    page_size = getattr(server_args, "page_size", None)
    if page_size is None or page_size <= 1:
        raise ValueError(f"--attention-backend art reads whole KV pages; --page-size is {page_size or 1}: "
                         "pass --page-size 16 (or another page size > 1)")
    if getattr(server_args, "speculative_algorithm", None):
        raise ValueError("--attention-backend art does not support speculative decoding (--speculative-algorithm)")


def _validate_after_parse(result, *args, **kwargs):
    """AFTER hook of ``ServerArgs.from_cli_args``: refuse a bad ART setup while parsing."""
    validate_server_args(result)
    return result


def _record_prefill_writes(result, backend, *args, **kwargs):
    """AFTER hook of ``HybridAttnBackend.forward``: the prefill backend wrote K/V; update ART's metadata."""
    from .backend import ARTAttnBackend

    decode = getattr(backend, "decode_backend", None)
    if isinstance(decode, ARTAttnBackend) and backend.prefill_backend is not decode:
        bound = _HYBRID_FORWARD_SIGNATURE.bind(backend, *args, **kwargs)
        forward_batch = bound.arguments["forward_batch"]
        if not forward_batch.forward_mode.is_decode() and bound.arguments.get("save_kv_cache", True):
            decode.record_extend(bound.arguments["q"], bound.arguments["layer"], forward_batch)
    return result


def _count_art_memory(cell_size, configurator, kvc, num_layers, *args, **kwargs):
    """AFTER hook of ``DefaultPoolConfigurator._compute_cell_size`` (SGLang's KV bytes per token):
    add what ART allocates per token (``backend.memory_per_page``), so that the pool sized from
    ``--mem-fraction-static`` leaves room for ART's page metadata instead of running out of
    memory when the backend allocates it."""
    if not uses_art(kvc.server_args):
        return cell_size
    from sglang.srt.runtime_context import get_parallel

    from .backend import memory_per_page
    from .options import resolve_options

    model = kvc.model_config
    per_page = memory_per_page(resolve_options(), kvc.page_size, model.head_dim)
    kv_heads = model.get_num_kv_heads(get_parallel().attn_tp_size)
    return cell_size + math.ceil(num_layers * kv_heads * per_page / kvc.page_size)


_HYBRID_FORWARD_SIGNATURE = None


def create_art_backend(model_runner):
    """Factory registered as SGLang attention backend ``art`` (imports the backend on first use)."""
    from .backend import ARTAttnBackend

    return ARTAttnBackend(model_runner)


def register() -> None:
    """Entry point of group ``sglang.srt.plugins``: backend ``art``, its CLI choice, the hooks.

    Idempotent; runs in every SGLang process.
    """
    global _HYBRID_FORWARD_SIGNATURE
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME in ATTENTION_BACKENDS:
        return
    register_attention_backend(BACKEND_NAME)(create_art_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    _HYBRID_FORWARD_SIGNATURE = inspect.signature(HybridAttnBackend.forward)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _validate_after_parse, HookType.AFTER)
    HookRegistry.register("sglang.srt.layers.attention.hybrid_attn_backend.HybridAttnBackend.forward",
                          _record_prefill_writes, HookType.AFTER)
    HookRegistry.register(POOL_CELL_SIZE, _count_art_memory, HookType.AFTER)
