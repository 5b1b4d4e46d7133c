"""Page-selection policies: which KV pages each (request, KV head) visits, in which order.

Each policy lives in its own file and only scores pages; ``base.PagePolicy`` turns scores
into a budgeted, ordered selection. ``get(name, **kwargs)`` builds one by name.
"""

from .base import PagePolicy, PolicyContext, SelectionLayout
from .dense import DensePolicy
from .h2o import H2OPolicy
from .quest import QuestPolicy
from .registry import REGISTRY, get, register
from .snapkv import SnapKVPolicy
from .streaming_llm import StreamingLLMPolicy

__all__ = [
    "REGISTRY",
    "DensePolicy",
    "H2OPolicy",
    "PagePolicy",
    "PolicyContext",
    "QuestPolicy",
    "SelectionLayout",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "get",
    "register",
]
