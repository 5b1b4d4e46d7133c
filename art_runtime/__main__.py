"""``python -m art_runtime``: the ``art-runtime`` command line (see ``art_runtime.cli``)."""
from .cli import main
raise SystemExit(main())
