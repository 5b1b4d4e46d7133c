"""Where the dashboards find real attention captures.

The shared captures (``data/captures/README.md`` format) live in ``shared/data/captures`` next
to the repository checkout, i.e. ``<repo>/../shared/data/captures``; CI lays ``shared/`` there
too. Pass a path to use a capture from anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTURES_DIR = REPO_ROOT.parent / "shared" / "data" / "captures"
DEFAULT_CAPTURE = "smollm2-135m_pride-prejudice_8k.safetensors"


def capture_path(capture: str | os.PathLike | None = None) -> Path:
    """The file of ``capture``: ``None`` is the SmolLM2 capture, a bare file name is looked up
    in :data:`CAPTURES_DIR`, anything else is a path.

    Raises
    ------
    ValueError
        Naming ``capture`` and where it was looked for, if the file does not exist.
    """
    if capture is None:
        capture = DEFAULT_CAPTURE
    if not isinstance(capture, (str, os.PathLike)):
        raise ValueError(f"capture must be a path or a file name, got {capture!r}")
    path = Path(capture)
    if len(path.parts) == 1 and not path.is_file():
        path = CAPTURES_DIR / path
    if not path.is_file():
        raise ValueError(f"capture {str(capture)!r} not found at {path}; the shared captures are expected in "
                         f"{CAPTURES_DIR} (shared/ next to the repository checkout)")
    return path
