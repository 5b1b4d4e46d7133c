"""Per-request state of stateful policies, batched: a slot per live request.

SnapKV and H2O keep numbers per (request, layer, KV head, page). Kept per request in Python,
every decode call would loop over the batch's requests (a few small device operations each,
per layer). Here each layer's state is one ``[slots, H_kv, capacity]`` tensor per quantity;
a request holds a slot from its first use until ``release``, a released slot goes to the
next new request cleared to the quantities' fill values, and the tensors grow by doubling.
Scoring a batch is then a gather by the batch's slots, whatever its size.
"""

from __future__ import annotations

import torch


class RequestSlots:
    """Slots of live requests and each layer's ``[slots, H_kv, capacity]`` state tensors.

    Parameters
    ----------
    fills : tuple of (torch.dtype, fill value)
        One per quantity of the state: its dtype and the value of a page with no history.
    """

    def __init__(self, fills: tuple):
        self.fills = fills
        self.slots: dict = {}   # request_id -> slot
        self.layers: dict = {}  # layer_id -> tuple of [slots, H_kv, capacity] tensors

    def assign(self, request_id) -> int:
        """``request_id``'s slot; a new request gets the lowest free one, cleared in every layer."""
        slot = self.slots.get(request_id)
        if slot is None:
            used = set(self.slots.values())
            slot = self.slots[request_id] = next(s for s in range(len(used) + 1) if s not in used)
            for state in self.layers.values():
                if slot < state[0].shape[0]:
                    for quantity, (_, fill) in zip(state, self.fills):
                        quantity[slot] = fill
        return slot

    def release(self, request_id) -> None:
        """Give ``request_id``'s slot back (no-op if it has none)."""
        self.slots.pop(request_id, None)

    @staticmethod
    def check_ids(request_ids, batch_size: int) -> None:
        """``ValueError`` naming ``request_ids`` unless they are ``batch_size`` distinct ids."""
        if request_ids is None or len(request_ids) != batch_size:
            raise ValueError("request_ids: this policy keeps state per request and needs one id per request")
        if len(set(request_ids)) != len(request_ids):
            raise ValueError("request_ids must be distinct within a batch")

    def batch(self, request_ids, batch_size: int, device) -> torch.Tensor:
        """``[B]`` int64 slots of a batch's requests (assigned as needed), after ``check_ids``."""
        self.check_ids(request_ids, batch_size)
        return torch.tensor([self.assign(request_id) for request_id in request_ids], dtype=torch.long, device=device)

    def reserve(self, width: int) -> None:
        """Grow every layer's state to every slot and ``width`` pages (at plan time, so that a
        decode call, perhaps under CUDA-graph capture, allocates nothing)."""
        for layer_id, state in self.layers.items():
            self.layers[layer_id] = self._grown(state, width)

    def layer(self, layer_id: int, num_kv_heads: int, width: int, device) -> tuple:
        """``layer_id``'s state tensors, created on first use or grown to every slot and ``width`` pages."""
        state = self.layers.get(layer_id)
        if state is None:
            slots = max(self.slots.values(), default=-1) + 1
            state = tuple(torch.full((slots, num_kv_heads, width), fill, dtype=dtype, device=device)
                          for dtype, fill in self.fills)
        self.layers[layer_id] = state = self._grown(state, width)
        return state

    def _grown(self, state: tuple, width: int) -> tuple:
        slots = max(self.slots.values(), default=-1) + 1
        have_slots, heads, have_width = state[0].shape
        if slots <= have_slots and width <= have_width:
            return state
        shape = (max(slots, 2 * have_slots) if slots > have_slots else have_slots, heads,
                 max(width, 2 * have_width) if width > have_width else have_width)
        grown = tuple(torch.full(shape, fill, dtype=dtype, device=quantity.device)
                      for quantity, (dtype, fill) in zip(state, self.fills))
        for old, new in zip(state, grown):
            new[:have_slots, :, :have_width] = old
        return grown
