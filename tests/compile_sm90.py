"""Compile every Triton kernel variant for sm_90 without a GPU (run by test_compile_sm90.py).

The Triton interpreter accepts code that the GPU compiler rejects (Python ``break``, ``tl.dot``
with K < 16, ...); compiling to a cubin here makes such code fail CPU CI. Runs in its own
process because kernels created under ``TRITON_INTERPRET=1`` cannot be compiled.

Mode ``off`` and Quest's scoring, as they launch for the core benchmark's shapes, must also
compile without register spills, and mode ``off`` must fit the programs an SM that its plans
count (``check_hot_launches``).
``python tests/compile_sm90.py --resources`` also prints each variant's registers and spill
bytes a thread (``cuobjdump --dump-resource-usage``, shipped with Triton): the numbers the GPU
will run with, since the variants are compiled as the launches specialize them.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from art_runtime.decode import (MERGE_TILE_ELEMENTS, SKETCH_STAGES, sketch_tile_pages, tail_order_warps,  # noqa: E402
                                tile_tokens)
from art_runtime.kernels.art_decode import art_decode_kernel, art_merge_kernel  # noqa: E402
from art_runtime.kernels.h2o_state import h2o_observe_kernel, h2o_page_scores_kernel  # noqa: E402
from art_runtime.kernels.page_bounds import (block_mass_estimate_kernel, block_suffix_kernel,  # noqa: E402
                                             page_mass_estimate_kernel, page_sketch_bound_kernel,
                                             segment_carry_kernel, tail_order_kernel, tail_suffix_kernel)
from art_runtime.kernels.page_metadata import page_metadata_update_kernel  # noqa: E402
from art_runtime.kernels.page_scoring import quest_page_scores_kernel  # noqa: E402
from art_runtime.kernels.page_selection import select_top_pages_kernel  # noqa: E402
from art_runtime.plan import group_tile, shared_heads_per_item  # noqa: E402
from art_runtime.selection import SELECTION_EDGE, dense_keys_fit_32_bits, selection_warps  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"qk_scale", "sm_scale", "tau_mag", "tau_dir", "eps", "value_norm_scale", "log2_slack", "log2_cut_share",
              "overflow_log2", "mass_max_share", "tie_break", "recent_score", "log2_share"}
SKETCH_PTRS = {"codes_ptr": "u8", "exponent_ptr": "i8"}


def signature(kernel, constexprs, pointer_types):
    """Triton signature: pointers by name (default fp32), floats by name, other scalars i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_types.get(name, "fp32")
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def launch_divisibility(kernel, constexprs):
    """The launches' specialization: pointers and ``stride_*`` arguments divisible by 16.

    torch's allocations are 16-byte aligned and every stride of ours is a multiple of the head
    dimension, so Triton's JIT sees 16-divisible pointers and strides at every launch; that is
    what turns on 16-byte loads and asynchronous copies. Compiled without the hint, a kernel
    takes paths no launch runs (scalar loads, no pipelining, other register counts).
    """
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if name not in constexprs and (name.endswith("_ptr") or name.startswith("stride_"))}


def compile_kernel(kernel, constexprs, pointer_types, **options):
    source = ASTSource(fn=kernel, signature=signature(kernel, constexprs, pointer_types), constexprs=constexprs,
                       attrs=launch_divisibility(kernel, constexprs))
    compiled = triton.compile(source, target=TARGET, options=options)
    assert compiled.asm["cubin"], kernel.fn.__name__
    if "--resources" in sys.argv:
        usage = resource_usage(compiled.asm["cubin"])
        registers = int(re.search(r"REG:(\d+)", usage).group(1))
        fit = programs_per_sm(registers, compiled.metadata.shared, compiled.metadata.num_warps)
        print(kernel.fn.__name__, usage, f"SHARED:{compiled.metadata.shared} PROGRAMS/SM:{fit}", constexprs, options)
    return compiled


def programs_per_sm(registers: int, shared_bytes: int, warps: int) -> int:
    """Programs of a kernel that an H100/H200 SM holds at once: 64K registers (allocated per warp
    in multiples of 8 a thread), 228 KB of shared memory (1 KB of it reserved per program), 64
    warps. Mode ``off``'s plans count this (``decode.off_programs_per_sm``, checked by
    ``check_hot_launches``; benchmarks/NOTES.md v53)."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    by_shared = 233472 // (shared_bytes + 1024)
    return min(by_registers, by_shared, 64 // warps)


def resource_usage(cubin: bytes) -> str:
    """``REG:n STACK:m`` of a cubin (registers a thread, spill stack bytes a thread)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", file.name], capture_output=True,
                                text=True, check=True).stdout
    return re.search(r"REG:\d+ STACK:\d+", report).group(0)


def main():
    count = 0
    int_ptrs = {n: "i32" for n in ("visit_phys_ptr", "visit_tokens_ptr", "work_row_ptr", "work_start_ptr",
                                  "work_end_ptr", "row_start_ptr", "visited_pages_ptr", "visited_tokens_ptr", "sketch_pages_ptr",
                                  "loaded_tokens_ptr",
                                  "stable_at_ptr", "row_work_indptr_ptr", "batch_indices_ptr", "positions_ptr",
                                  "append_indptr_ptr", "kv_indices_ptr", "kv_indptr_ptr", "sel_indptr_ptr", "pages_ptr",
                                  "kv_last_page_len_ptr", "phys_ptr", "tokens_ptr", "predicted_blocks_ptr", "slot_ptr")}
    int_ptrs["work_order_ptr"] = "i64"
    # Every value of every parameter appears with every mode; the full product takes ~9 min.
    shapes = [("bf16", 1, 64, 1, 64), ("fp16", 7, 64, 16, 4), ("fp32", 4, 128, 64, 1), ("bf16", 16, 256, 3, 21),
              ("bf16", 8, 128, 16, 4)]
    variants = [(shape, mode, values, split) for shape in shapes for mode in (0, 1, 2, 3)
                for values in ((False, True) if mode == 2 else (False,)) for split in (False, True)]
    for (dtype, group, dim, page, block_pages), mode, values, split in variants:
        group_pad = group_tile(group + (mode == 3))  # as BatchARTDecodeWrapper: mass pads one row more
        block_n = max(16, 1 << (page * block_pages - 1).bit_length())
        ptrs = dict(int_ptrs, q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, out_ptr=dtype)
        page_mass = block_n == page * block_pages and split  # H2O's page mass (power-of-two blocks only)
        constexprs = dict(NUM_KV_HEADS=2, GROUP_SIZE=group, GROUP_PAD=group_pad, HEAD_DIM=dim, PAGE_SIZE=page,
                          BLOCK_PAGES=block_pages, BLOCK_N=block_n, MODE=mode, VALUES_RELATIVE=values, SPLIT=split,
                          DOT_IN_INPUT_DTYPE=dtype != "fp32", PAGE_MASS=page_mass, PASS_BLOCKS=8,
                          SPECULATE=dim <= 64, HEADS=1)
        compile_kernel(art_decode_kernel, constexprs, ptrs, num_warps=2 if mode == 1 and dim <= 128 else 4,
                       num_stages=2)  # decode.BatchARTDecodeWrapper._num_warps
        count += 1
        heads = shared_heads_per_item(2, group, dim)
        if mode == 0 and heads > 1:  # a dense selection that both KV heads share: one program reads both
            fused_pages = max(1, tile_tokens(dim * heads) // page)
            compile_kernel(art_decode_kernel, dict(constexprs, HEADS=heads, PAGE_MASS=False, BLOCK_PAGES=fused_pages,
                                                   BLOCK_N=max(16, 1 << (page * fused_pages - 1).bit_length())),
                           ptrs, num_warps=4, num_stages=2)
            count += 1
        box_ptrs = dict(int_ptrs, q_ptr=dtype, key_min_ptr="fp8e4nv", key_max_ptr="fp8e4nv")
        if mode == 3 and not split:  # the pre-pass does not depend on the split
            pages_pow2 = 1 << (block_pages - 1).bit_length()
            compile_kernel(block_mass_estimate_kernel,
                           dict(NUM_KV_HEADS=2, GROUP_SIZE=group, GROUP_PAD=group_pad, HEAD_DIM=dim,
                                BLOCK_D=min(64, dim), BLOCK_PAGES=block_pages, PAGES_POW2=pages_pow2,
                                TILE_BLOCKS=max(1, 128 // pages_pow2), TENSOR_CORES=dtype != "fp32"),
                           box_ptrs, num_warps=4, num_stages=3)  # decode.ESTIMATE_STAGES
            compile_kernel(block_suffix_kernel, dict(GROUP_SIZE=group, GROUP_PAD=group_pad, BLOCK_PAGES=block_pages,
                                                     TILE_BLOCKS=1024 // group_pad), int_ptrs)  # decode
            count += 2
        if mode == 2 and not split:
            page_pow2 = 1 << (page - 1).bit_length()
            segments = 3
            lanes = 1 << (group - 1).bit_length()  # decode: next_power_of_two(group_size)
            common = dict(NUM_KV_HEADS=2, GROUP_SIZE=group, GROUP_PAD=group_pad, HEAD_DIM=dim, SEG_PAGES=64,
                          SEGMENTS=segments)
            compile_kernel(page_mass_estimate_kernel, dict(common, BLOCK_D=min(64, dim), TILE=32,
                                                           TENSOR_CORES=dtype != "fp32"),
                           box_ptrs)
            for certified in (False, True):
                compile_kernel(segment_carry_kernel, dict(GROUP_SIZE=group, GROUP_PAD=group_pad, LANES=lanes, TILE=32,
                                                          SEG_PAGES=64, SEGMENTS=segments, SEGMENTS_POW2=4,
                                                          CERTIFIED=certified), int_ptrs)
            compile_kernel(page_sketch_bound_kernel,
                           dict(common, TILE=sketch_tile_pages(dim, page), SEGMENTS_POW2=4,
                                DOT_IN_INPUT_DTYPE=dtype != "fp32", PAGE_SIZE_POW2=page_pow2),
                           dict(box_ptrs, **SKETCH_PTRS), num_stages=SKETCH_STAGES)
            compile_kernel(tail_suffix_kernel, dict(NUM_KV_HEADS=2, GROUP_PAD=group_pad, LANES=lanes, TILE=32,
                                                    SEG_PAGES=64, SEGMENTS=segments), dict(int_ptrs, visit_perm_ptr="i64"))
            count += 5
        if mode == 2:
            compile_kernel(quest_page_scores_kernel,
                           dict(NUM_KV_HEADS=2, GROUP_SIZE=group, GROUP_PAD=group_pad, HEAD_DIM=dim, BLOCK_D=min(64, dim),
                                TILE=128, REDUCE_MAX=not split, ESTIMATE=values, TENSOR_CORES=dtype != "fp32"),
                           box_ptrs)
            count += 1
        if split and mode == 0:
            compile_kernel(art_merge_kernel, dict(NUM_KV_HEADS=2, GROUP_SIZE=group, GROUP_PAD=group_pad, HEAD_DIM=dim,
                                                  CHUNKS=MERGE_TILE_ELEMENTS // dim),
                           dict(int_ptrs, out_ptr=dtype))
            count += 1
    for width_pow2 in (16, 2048, 8192):  # decode.BatchARTDecodeWrapper._run_bound_prepass
        compile_kernel(tail_order_kernel, dict(WIDTH_POW2=width_pow2),
                       dict(int_ptrs, visit_perm_ptr="i64", run_phys_ptr="i32", run_tokens_ptr="i32",
                            run_pages_ptr="i32"), num_warps=tail_order_warps(width_pow2))
        count += 1
    for dtype, page, dim, sketch in [("bf16", 1, 64, True), ("fp16", 3, 128, True), ("fp32", 16, 256, True),
                                     ("bf16", 64, 128, True), ("bf16", 16, 128, False)]:
        # without a sketch PageMetadata.update passes its fp32 key scales for the sketch pointers
        sketch_ptrs = SKETCH_PTRS if sketch else dict.fromkeys(SKETCH_PTRS, "fp32")
        ptrs = dict(int_ptrs, **sketch_ptrs, key_ptr=dtype, value_ptr=dtype, kmin_ptr="fp8e4nv", kmax_ptr="fp8e4nv")
        compile_kernel(page_metadata_update_kernel, dict(PAGE_SIZE=page, PAGE_SIZE_POW2=1 << (page - 1).bit_length(),
                                                         HEAD_DIM=dim, SKETCH=sketch), ptrs)
        count += 1
    for width_pow2, physical, keep_all, slots in (
            (16, False, False, False), (2048, True, False, False), (8192, False, False, False), (8192, True, False, True),
            (16, True, True, False), (2048, True, True, True), (8192, False, True, False)):
        kept_pow2 = width_pow2 if keep_all else max(16, width_pow2 // 16)
        compile_kernel(select_top_pages_kernel, dict(NUM_KV_HEADS=8, WIDTH_POW2=width_pow2, KEPT_POW2=kept_pow2,
                                                    EDGE=SELECTION_EDGE, KEEP_ALL=keep_all,
                                                    PHYSICAL=physical, SLOTS=slots,
                                                    KEY32=dense_keys_fit_32_bits(keep_all, width_pow2),
                                                    POS_BITS=(width_pow2 - 1).bit_length()),
                       dict(int_ptrs, keys_ptr="i64"), num_warps=selection_warps(width_pow2, keep_all))
        count += 1
    for split in (False, True):  # four KV heads a program at head_dim 32, fp32 (ieee dots): the widest HEADS
        heads, group, dim, page = 4, 4, 32, 8
        assert shared_heads_per_item(4, group, dim) == heads
        block_pages = tile_tokens(dim * heads) // page
        compile_kernel(art_decode_kernel, dict(
            NUM_KV_HEADS=4, GROUP_SIZE=group, GROUP_PAD=group_tile(group), HEAD_DIM=dim, PAGE_SIZE=page,
            BLOCK_PAGES=block_pages, BLOCK_N=block_pages * page, MODE=0, VALUES_RELATIVE=False, SPLIT=split,
            DOT_IN_INPUT_DTYPE=False, PAGE_MASS=False, PASS_BLOCKS=8, SPECULATE=True, HEADS=heads),
            dict(int_ptrs, q_ptr="fp32", k_ptr="fp32", v_ptr="fp32", out_ptr="fp32"), num_warps=4, num_stages=2)
        count += 1
    for paged in (False, True):  # state per request slot, or per physical page (SGLang: kv_indptr stands in)
        h2o_ptrs = dict(int_ptrs, evicted_ptr="i1", slots_ptr="i32" if paged else "i64")
        compile_kernel(h2o_page_scores_kernel, dict(NUM_KV_HEADS=8, TILE=64, PAGED=paged), h2o_ptrs)
        compile_kernel(h2o_observe_kernel, dict(NUM_KV_HEADS=8, TILE=64, KEPT_TILE=64, PAGED=paged), h2o_ptrs)
        count += 2
    count += check_hot_launches(int_ptrs)
    count += check_termination_loop_double_buffers(int_ptrs)
    print(f"compiled {count} kernel variants for sm_90")


def check_hot_launches(int_ptrs) -> int:
    """Mode ``off`` and Quest's scoring as they launch for the core benchmark's shapes
    (32/8/128 and 14/2/64, bf16, page 16; mode ``off`` also at SmolLM2-135M's 9/3/64 and at
    32/4/64, group 8) compile without register spills, and mode ``off`` fits as many programs on
    an SM as its plan counts (``decode.off_programs_per_sm``): a spill, or slots that are not the
    device's, is a slowdown no CPU test would otherwise see. Returns the variants compiled."""
    from types import SimpleNamespace

    from art_runtime.decode import (PASS_BLOCKS, SPECULATE_MAX_HEAD_DIM, BatchARTDecodeWrapper, off_programs_per_sm,
                                    tile_tokens)
    from art_runtime.page_scores import SCORE_BLOCK_D, SCORE_STAGES, SCORE_TILE

    page = 16
    launches = []
    for kv_heads, group, dim in ((8, 4, 128), (2, 7, 64), (3, 3, 64), (4, 8, 64)):
        # per KV head (a policy's own order per head), and the dense plan's heads read together
        for heads in sorted({1, shared_heads_per_item(kv_heads, group, dim)}):
            plan = SimpleNamespace(head_dim=dim, page_size=page, block_pages=tile_tokens(dim * heads) // page,
                                   heads_per_item=heads, termination=SimpleNamespace(mode="off"))
            block_n, warps, stages = BatchARTDecodeWrapper._kernel_launch(plan, SimpleNamespace(type="cuda"), 2)
            for split in (False, True):
                launches.append((art_decode_kernel, dict(
                    NUM_KV_HEADS=kv_heads, GROUP_SIZE=group, GROUP_PAD=group_tile(group), HEAD_DIM=dim,
                    PAGE_SIZE=page, BLOCK_PAGES=plan.block_pages, BLOCK_N=block_n, MODE=0, VALUES_RELATIVE=False,
                    SPLIT=split, DOT_IN_INPUT_DTYPE=True, PAGE_MASS=False, PASS_BLOCKS=PASS_BLOCKS,
                    SPECULATE=dim <= SPECULATE_MAX_HEAD_DIM, HEADS=heads),
                    dict(int_ptrs, q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", out_ptr="bf16"),
                    dict(num_warps=warps, num_stages=stages)))
        if kv_heads in (3, 4):
            continue
        launches.append((quest_page_scores_kernel, dict(
            NUM_KV_HEADS=8, GROUP_SIZE=group, GROUP_PAD=group_tile(group), HEAD_DIM=dim,
            BLOCK_D=min(SCORE_BLOCK_D, dim), TILE=SCORE_TILE, REDUCE_MAX=True, ESTIMATE=False, TENSOR_CORES=True),
            dict(int_ptrs, q_ptr="bf16", key_min_ptr="fp8e4nv", key_max_ptr="fp8e4nv"),
            dict(num_warps=4, num_stages=SCORE_STAGES)))
    for kernel, constexprs, pointer_types, options in launches:
        compiled = compile_kernel(kernel, constexprs, pointer_types, **options)
        usage = resource_usage(compiled.asm["cubin"])
        assert usage.endswith("STACK:0"), f"{kernel.fn.__name__} spills registers ({usage}): {constexprs} {options}"
        if kernel is art_decode_kernel:
            fit = programs_per_sm(int(re.search(r"REG:(\d+)", usage).group(1)), compiled.metadata.shared,
                                  options["num_warps"])
            planned = off_programs_per_sm(constexprs["HEAD_DIM"] * constexprs["HEADS"])
            assert fit == planned, f"mode off fits {fit} programs an SM ({usage}, shared {compiled.metadata.shared} B), " \
                                   f"its plan counts {planned}: {constexprs} {options}"
    return len(launches)


def check_termination_loop_double_buffers(int_ptrs) -> int:
    """At head_dim 64 the termination modes' K/V tiles are pipelined two buffers deep, as mode
    ``off``'s: their loop loads the next block's page ids a block ahead. Loaded in front of their
    own block's K/V, the ids took a pipeline stage and left K and V one buffer each, at any
    ``num_stages`` (benchmarks/NOTES.md v39: mass 10% slower on real captures), a slowdown no CPU
    test would otherwise see. Returns the variants compiled."""
    from types import SimpleNamespace

    from art_runtime import TerminationConfig
    from art_runtime.decode import PASS_BLOCKS, SPECULATE_MAX_HEAD_DIM, BatchARTDecodeWrapper, tile_tokens
    from art_runtime.plan import kernel_block_pages

    page, group, dim = 16, 7, 64  # Qwen2.5-0.5B's shape (14/2/64)
    count = 0
    for mode in ("stability", "bound", "mass"):
        termination = TerminationConfig(mode=mode)
        block_pages = kernel_block_pages(termination, page, tile_tokens(dim))
        block_n = block_pages * page
        stages = BatchARTDecodeWrapper._num_stages(SimpleNamespace(head_dim=dim, heads_per_item=1), block_n, 2)
        for warps in (2, 4) if mode == "stability" else (4,):  # decode.BatchARTDecodeWrapper._num_warps
            compiled = compile_kernel(art_decode_kernel, dict(
                NUM_KV_HEADS=2, GROUP_SIZE=group, GROUP_PAD=group_tile(group + (mode == "mass")), HEAD_DIM=dim,
                PAGE_SIZE=page, BLOCK_PAGES=block_pages, BLOCK_N=block_n, MODE=termination.mode_code,
                VALUES_RELATIVE=False, SPLIT=False, DOT_IN_INPUT_DTYPE=True, PAGE_MASS=False,
                PASS_BLOCKS=PASS_BLOCKS, SPECULATE=dim <= SPECULATE_MAX_HEAD_DIM, HEADS=1),
                dict(int_ptrs, q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", out_ptr="bf16"),
                num_warps=warps, num_stages=stages)
            # The pipeline's buffers: allocations without an initial value, [buffers, BLOCK_N, D].
            buffers = [int(n) for n in re.findall(rf"ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x{block_n}x{dim}xbf16",
                                                  compiled.asm["ttgir"])]
            assert len(buffers) == 2 and min(buffers) >= 2, \
                f"mode {mode} at {warps} warps: K/V pipeline buffers {buffers}, expected two allocations of >= 2"
            count += 1
    return count


if __name__ == "__main__":
    sys.exit(main())
