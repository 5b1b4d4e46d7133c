"""ART runtime: paged decode attention that stops reading a head's KV pages at run time.

Flow: a policy selects and orders pages (``art_runtime.policies``) -> ``PageSelection`` ->
``BatchARTDecodeWrapper`` plans and runs the kernel (``art_runtime.kernels``) -> ``DecodeStats``.
"""

from .decode import BatchARTDecodeWrapper, DecodeStats
from .page_metadata import PageMetadata
from .selection import PageSelection, dense_selection
from .termination import TerminationConfig

__all__ = [
    "BatchARTDecodeWrapper",
    "DecodeStats",
    "PageMetadata",
    "PageSelection",
    "TerminationConfig",
    "dense_selection",
]
__version__ = "0.1.0"
