"""Loading the built-in components and the plug-ins into the registries of
:mod:`alignkit.core.registry` (this lives outside ``core``: it imports the adapters and tasks)."""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Sequence

from alignkit.core.errors import MissingPackage
from alignkit.core.registry import PLUGIN_ENV, PLUGIN_GROUP

_LOADED: list[str] = []  # plug-ins imported in this process ("<builtin>" first)


def load_plugins(extra: Sequence[str] = ()) -> list[str]:
    """Import the built-in components, then the plug-ins: modules in ``$ALIGNKIT_PLUGINS`` and
    ``extra`` (the CLI's ``--plugin``), and the entry points of the group ``alignkit.plugins``.
    Each is imported once per process; returns the plug-ins loaded so far."""
    if not _LOADED:
        import alignkit.adapters  # noqa: F401  (built-in adapters register at import)
        import alignkit.core.callbacks  # noqa: F401
        import alignkit.core.objectives  # noqa: F401
        import alignkit.core.optim  # noqa: F401
        import alignkit.core.projections  # noqa: F401
        import alignkit.core.schedules  # noqa: F401
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
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise MissingPackage(f"plug-in {module!r} (from ${PLUGIN_ENV} or --plugin) cannot be imported: {err}") from None
        _LOADED.append(module)
    return _LOADED[1:]
