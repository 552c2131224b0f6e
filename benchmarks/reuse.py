"""Load the repository's ``scripts/bench_*.py`` as modules, so sections reuse them.

``scripts/`` is not a package (each script runs as ``python scripts/x.py``); the
sections import their measurement functions instead of copying them. A script
loaded here keeps its real ``__file__``, so scripts that re-run themselves in a
subprocess (``bench_rounds``) still work.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["REPO_ROOT", "load_script"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` once and return it (cached in ``sys.modules``)."""
    module_name = f"_fl_app_bench_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = REPO_ROOT / "scripts" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"name: no script {path}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
