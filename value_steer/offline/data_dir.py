"""Where prepared models, captures and reports are cached (never inside git).

Resolution order (first that applies wins):

1. ``$VALUE_STEER_DATA_DIR`` (the Makefile exports ``$(CURDIR)/.data``);
2. ``<repo>/.data`` when ``value_steer`` is imported from a source checkout (editable install), else
   ``<checkout>/.data`` for the first directory at or above the current directory holding a
   ``pyproject.toml`` of this project;
3. ``~/.cache/value_steer``.

A candidate that cannot be created or written falls through to the next one. The directory is created
on demand.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "VALUE_STEER_DATA_DIR"
_PROJECT_NAME = 'name = "value-steer"'


def _is_checkout(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    try:
        return pyproject.is_file() and _PROJECT_NAME in pyproject.read_text(encoding="utf-8")
    except OSError:
        return False


def repo_root() -> Path | None:
    """The source checkout this package lives in (or, failing that, one at or above the cwd)."""
    pkg_parent = Path(__file__).resolve().parents[2]
    if _is_checkout(pkg_parent):
        return pkg_parent
    cwd = Path.cwd().resolve()
    for path in (cwd, *cwd.parents):
        if _is_checkout(path):
            return path
    return None


def _usable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def data_dir() -> Path:
    """The value_steer data directory (created if missing)."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)  # an explicit choice: fail loudly if unusable
        return path
    candidates: list[Path] = []
    root = repo_root()
    if root is not None:
        candidates.append(root / ".data")
    candidates.append(Path.home() / ".cache" / "value_steer")
    for path in candidates:
        if _usable(path):
            return path
    raise OSError(f"no writable value_steer data directory among {[str(p) for p in candidates]}; set ${ENV_VAR}")
