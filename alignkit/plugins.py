"""Loading the built-in components and the plug-ins into the registries of
:mod:`alignkit.core.registry` (this lives outside ``core``: it imports the adapters and tasks)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Sequence

from alignkit.core.errors import MissingFile, MissingPackage
from alignkit.core.registry import PLUGIN_ENV, PLUGIN_GROUP

_LOADED: list[str] = []  # plug-ins imported in this process ("<builtin>" first)


def load_plugins(extra: Sequence[str] = ()) -> list[str]:
    """Import the built-in components, then the plug-ins: modules (names, or ``.py`` files by
    path) in ``$ALIGNKIT_PLUGINS`` and ``extra`` (the CLI's ``--plugin``), and the entry points
    of the group ``alignkit.plugins``. Each is imported once per process; returns the plug-ins
    loaded so far."""
    if not _LOADED:
        import alignkit.adapters  # noqa: F401  (built-in adapters register at import)
        import alignkit.core.callbacks  # noqa: F401
        import alignkit.core.objectives  # noqa: F401
        import alignkit.core.optim  # noqa: F401
        import alignkit.core.projections  # noqa: F401
        import alignkit.core.schedules  # noqa: F401
        import alignkit.core.wandb_logger  # noqa: F401
        import alignkit.tasks  # noqa: F401

        _LOADED.append("<builtin>")
        for point in entry_points(group=PLUGIN_GROUP):
            loaded = point.load()
            if callable(loaded):
                loaded()
            _LOADED.append(f"{point.name} ({point.value})")
    modules = [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()] + list(extra)
    for module in modules:
        if module in _LOADED:
            continue
        if module.endswith(".py"):
            _import_file(Path(module))
        else:
            _import_module(module)
        _LOADED.append(module)
    return _LOADED[1:]


def _import_module(name: str) -> None:
    """A module name, found on the import path with the working directory added (as ``python -m``
    would), so a plug-in next to the recipe needs no PYTHONPATH."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise MissingPackage(f"plug-in {name!r} (from ${PLUGIN_ENV} or --plugin) cannot be imported: {err} "
                             "(pass a file as --plugin path/to/plugin.py, or put its folder on PYTHONPATH)") from None


def _import_file(path: Path) -> None:
    """A plug-in given as a file: imported under its stem, with its folder on the import path
    (so it can import its neighbours)."""
    if not path.is_file():
        raise MissingFile(f"plug-in {str(path)!r} (from ${PLUGIN_ENV} or --plugin): no such file")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
