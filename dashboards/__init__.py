"""Interactive Jupyter dashboards of ART termination (ipywidgets + plotly).

* :class:`LiveDashboard`: a layer x KV head heatmap of termination depth, its histogram, KV
  bytes saved over time and a per-request view, live from a stats stream
  (:mod:`art_runtime.stats`); aggregation in :class:`LiveState` (no UI).
* :class:`ExploreDashboard`: no server; termination settings and page policies recomputed
  exactly on a real attention capture (:class:`ExploreModel`, no UI).
* :class:`DecodeStatsStreamer`: what a decode loop calls to feed a live dashboard;
  :func:`start_replay` runs ART over a capture and streams its real stats, for a live
  dashboard without a model.

Notebooks: ``dashboards/live.ipynb`` and ``dashboards/explore.ipynb``.
"""

from .captures import CAPTURES_DIR, DEFAULT_CAPTURE, capture_path
from .explore import ExploreDashboard, ExploreModel, ExploreResult
from .live import LiveDashboard
from .publish import CaptureReplay, DecodeStatsStreamer, ReplayThread, start_replay
from .state import LiveState, Snapshot

__all__ = [
    "CAPTURES_DIR",
    "DEFAULT_CAPTURE",
    "CaptureReplay",
    "DecodeStatsStreamer",
    "ExploreDashboard",
    "ExploreModel",
    "ExploreResult",
    "LiveDashboard",
    "LiveState",
    "ReplayThread",
    "Snapshot",
    "capture_path",
    "start_replay",
]
