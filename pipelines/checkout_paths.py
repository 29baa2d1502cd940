"""Imported first by the scripts under ``pipelines/`` for its effect: the checkout's
``efficientqat`` importable, with ``efficientqat.kernels`` mapped onto ``./kernels`` when the
package is not pip-installed (the GPU machine runs the scripts from a bare copy of the checkout,
with nothing installed)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
try:
    import efficientqat.kernels  # noqa: F401
except ImportError:
    import efficientqat

    efficientqat.__path__.append(str(ROOT))
    import efficientqat.kernels  # noqa: F401
