"""Importing ``torchvision`` and ``timm`` (the ``[vision]`` extra) for the image adapter and task.

Both are imported only when an image model or image data is built: together they take seconds
to import, which no text or time-series run should pay.

A CPU build of torch next to PyPI's torchvision wheel (built against CUDA torch): torchvision's
compiled ``_C`` extension cannot load, and torchvision then runs without its compiled ops
(detection ops; image classification and ``transforms.v2`` do not use them). But its
``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and ``::qnms``
unconditionally, and torch refuses a fake kernel for an operator that does not exist, so
``import torchvision`` fails -- in transformers too, which imports it for some model configs.
Where the extension cannot load, importing this module defines those two operators' schemas (no
kernels: calling them still fails); where it loads (a CUDA torch, or torchvision's own CPU
wheel), or torchvision is not installed, nothing is defined.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from alignkit.core.errors import MissingPackage

INSTALL_HINT = "pip install 'alignkit[vision]' (torchvision==0.28.0 and timm)"
_MISSING_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_schemas: list[torch.library.Library] = []  # held: a Library's definitions go when it is collected


def _require(name: str, needed_by: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise MissingPackage(f"{needed_by} needs {name}, which is not installed: {INSTALL_HINT}")


def _extension_loads(package_dir: Path) -> bool:
    """Whether torchvision's compiled ops load next to this torch (torchvision loads the same file)."""
    for library in package_dir.glob("_C.*"):
        try:
            torch.ops.load_library(str(library))
            return True
        except OSError:
            return False
    return False


def _let_torchvision_import_without_its_ops() -> None:
    """Define the operators torchvision's meta registrations need where its extension cannot
    load (see the module docstring). Run when this module is first imported (registering the
    adapters imports it), so every later ``import torchvision`` succeeds, transformers' own too."""
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    if not _extension_loads(Path(list(spec.submodule_search_locations)[0])):
        library = torch.library.Library("torchvision", "DEF")
        for schema in _MISSING_OPS:
            library.define(schema)
        _schemas.append(library)


def import_torchvision(needed_by: str) -> ModuleType:
    """``torchvision``; ``needed_by`` names what asked (the config key) in the install hint."""
    _require("torchvision", needed_by)
    return importlib.import_module("torchvision")


def import_transforms_v2(needed_by: str) -> ModuleType:
    """``torchvision.transforms.v2`` (a subpackage ``import torchvision`` leaves unloaded)."""
    import_torchvision(needed_by)
    return importlib.import_module("torchvision.transforms.v2")


def import_timm(needed_by: str) -> ModuleType:
    """``timm`` (which imports torchvision: through :func:`import_torchvision` first)."""
    import_torchvision(needed_by)
    _require("timm", needed_by)
    return importlib.import_module("timm")


_let_torchvision_import_without_its_ops()
