"""ART decode on a plan whose buffers never move, for SGLang's CUDA graphs.

``BatchARTDecodeWrapper.plan`` sizes its plan from the batch (it synchronizes and allocates),
which a captured graph cannot follow. Here the plan is dense in recency order and unsplit
(one work item per (request, KV head)), laid out in fixed buffers
(:class:`~art_runtime.integrations.sglang.paging.StaticPlanBuffers`) that are refilled before
every replay; ``run`` is the wrapper's own Triton path.
"""

from __future__ import annotations

from art_runtime.decode import BatchARTDecodeWrapper
from art_runtime.termination import TerminationConfig

from .paging import StaticPlanBuffers

# Wrapper buffers with one entry per work item or row: viewed per batch size. The others
# (bound terms per visit position) are sized by the fixed capacity and shared as they are.
_PER_ROW = ("_visited_pages", "_visited_tokens", "_stable_at", "_vscale", "_sketch_pages")


class StaticPlanDecodeWrapper(BatchARTDecodeWrapper):
    """``BatchARTDecodeWrapper`` bound to :class:`StaticPlanBuffers` (Triton backend only).

    This subclass sets the wrapper's plan state itself instead of calling ``plan()``; it
    relies on the attributes ``plan()`` would set (``_plan``, ``_backend``, ``_policy``,
    ``_selection``, ``_page_table``, ``_pages_in_table``, ``_record_page_mass``,
    ``_raw_stats``) and the buffers ``_allocate`` makes.

    Parameters
    ----------
    buffers : StaticPlanBuffers
    max_batch : int
        Largest batch (requests) any captured graph has.
    num_qo_heads, head_dim, page_size : int
    termination : TerminationConfig
    sm_scale : float
    num_pages : int
        Pages of the KV pool (bounds every page id).
    """

    def __init__(self, buffers: StaticPlanBuffers, max_batch: int, num_qo_heads: int, head_dim: int, page_size: int,
                 termination: TerminationConfig, sm_scale: float, num_pages: int):
        super().__init__(kv_layout="NHD", backend="triton")
        self._static = buffers
        self._shape = (num_qo_heads, head_dim, page_size, termination, sm_scale, num_pages)
        self._backend = "triton"
        self._policy = None
        self._record_page_mass = False
        self._pages_in_table = 0  # counts key-box reads of scoring policies: none here
        self._page_table = None  # bound mode always gets the page metadata, never rebuilds it
        self._plans = {}
        self._allocate(self._plan_for(max_batch), buffers.row_start.device)
        self._full = {name: getattr(self, name) for name in _PER_ROW}

    def _plan_for(self, batch: int):
        if batch not in self._plans:
            self._plans[batch] = self._static.plan(batch, *self._shape)
        return self._plans[batch]

    def bind(self, batch: int) -> None:
        """Point ``run`` at the plan of a ``batch``-request graph (call before capture and replay)."""
        plan = self._plan_for(batch)
        rows = plan.num_rows
        for name in _PER_ROW:
            setattr(self, name, self._full[name][:rows])
        self._plan = plan
        self._selection = None  # last_stats.selection: the order is implicit (recency), not materialized
        self._raw_stats = None

    def plan(self, *args, **kwargs):
        raise ValueError("StaticPlanDecodeWrapper is planned by StaticPlanBuffers.fill() and bind(), not plan()")
