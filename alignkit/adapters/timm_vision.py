"""Any ``timm`` image model (ViT, ResNet, ConvNeXt, ...) as an alignkit student or teacher.

Model: ``timm.create_model(options.model_name, num_classes=..., in_chans=..., **options.model_kwargs)``
(classes and channels from the data unless set; ``img_size`` is passed to the models whose
constructor takes one, e.g. ViTs). Input ``pixel_values`` [B, C, H, W] is resized (bilinear) to
``options.img_size`` when the batch's size differs, so a student and a teacher of different
resolutions share one batch. Loss: cross-entropy on ``labels``.

Layers (the convention of :mod:`alignkit.core.adapter`): the blocks are the modules timm's
``feature_info`` names, in order (a ViT's ``blocks.i``; a ResNet's stem activation and
``layer1..4``; a ConvNeXt's ``stages.i``): ``0`` = the input of the first, ``i`` = the output of
the ``i``-th, ``-1`` = what ``forward_features`` returns (after the final norm where the model
has one). In-place activations are switched off: a tap keeps a module's input or output, which
an in-place op after it would overwrite.

Features are per position, [B, P, D]:

* a CNN map [B, C, H, W] (``NHWC`` where the model declares that ``output_fmt``) is flattened
  over its H x W positions, row by row;
* a ViT block's tokens [B, N, D]: the model's ``num_prefix_tokens`` class/register tokens are
  dropped (``prefix_tokens: drop``, the default) or kept in front of the patch tokens (``keep``:
  only where the other model has as many);
* positions of different grids: ``feature_grid: G`` > 0 resamples every map's position grid
  (a ViT's patch tokens laid out on their ``patch_embed.grid_size``) to G x G by 2-D bilinear
  interpolation (antialiased where it shrinks) before flattening. A student and a teacher whose
  grids differ (a ViT's 8 x 8 patches, a CNN's 4 x 4 map) are compared position by position when
  both set the same G. Widths differ freely: the alignment term's projection matches them.

Weights: ``source: config`` = timm's initialisation (or its hub weights with ``pretrained: true``,
which needs the network); ``source: checkpoint`` + ``name_or_path`` = a folder written by
:meth:`TimmVisionModel.save_pretrained` (the ``final/`` of an ``image_classify`` run). A teacher
without ``name_or_path`` has no weights (capability ``teacher_from_student``): the task's teacher
stage pre-trains it first (:mod:`alignkit.teacher_stage`). On the meta device (``alignkit check``)
no weights are read: the model is built from its options.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignkit.adapters.common import resolve_path, weight_files
from alignkit.adapters.vision_imports import import_timm
from alignkit.core.adapter import Batch, DataInfo, StudentOutput, resolve_layer
from alignkit.core.config import at_least, checked, one_of
from alignkit.core.errors import ConfigError, MissingFile, ModelLoadError
from alignkit.core.registry import register_adapter
from alignkit.core.taps import LayerTaps
from alignkit.core.teacher import FrozenTeacher

__all__ = ["TimmVisionOptions", "TimmVisionModel", "TimmVisionTeacher", "build_timm_vision_student",
           "build_timm_vision_teacher"]

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "timm_vision.json"
PREFIX_TOKENS = ("drop", "keep")


@dataclass
class TimmVisionOptions:
    """``options`` of kind ``timm_vision``."""

    model_name: str = "resnet18"  # any name timm.list_models() gives
    pretrained: bool = False  # true: timm's hub weights (needs the network)
    img_size: int = checked(32, at_least(1))  # the model's input side; batches of another size are resized
    in_chans: int = checked(0, at_least(0))  # 0 = from the data
    num_classes: int = checked(0, at_least(0))  # 0 = from the data
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (depth, channels, ...)
    prefix_tokens: str = checked("drop", one_of(*PREFIX_TOKENS))  # a ViT's class/register tokens in the features
    feature_grid: int = checked(0, at_least(0))  # > 0: resample every feature map to this many positions a side
    align_layer: Optional[int] = None  # the layer LET aligns by default; None = a quarter of the layers


def probed_at(probed: dict[int, int], num_layers: int, layer: int) -> int:
    """The value ``probed`` holds for ``layer`` (any index of the layer convention)."""
    return probed[resolve_layer(layer, num_layers)]


class TimmVisionModel(nn.Module):
    """Student adapter around a timm model: ``forward(batch, layers) -> StudentOutput`` with
    ``batch = {"pixel_values": [B, C, H, W], "labels": [B]}``."""

    logits_kind = "per_sample"  # what a logit_kd term compares (core/adapter.py LOGITS_KINDS)

    def __init__(self, model: nn.Module, options: TimmVisionOptions) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not info:
            raise ConfigError(f"options.model_name={options.model_name!r}: this timm model lists no feature_info, "
                              "so its layers cannot be tapped; pick another model")
        for module in model.modules():  # taps keep tensors that an in-place activation would overwrite
            if getattr(module, "inplace", None) is True:
                module.inplace = False
        self.model, self.options = model, options
        self.features_out = nn.Identity()  # its output is layer -1 (what forward_features returns)
        self.num_layers = len(info)
        self._taps = LayerTaps([model.get_submodule(entry["module"]) for entry in info], self.features_out)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.channels_last = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
        align = options.align_layer if options.align_layer is not None else max(1, round(self.num_layers / 4))
        self.align_layer = resolve_layer(align, self.num_layers, "options.align_layer")
        self.widths, self.position_counts = self._probe()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _probe(self) -> tuple[dict[int, int], dict[int, int]]:
        """The width and the number of positions of every layer, from one forward of a blank
        image in eval mode (nothing learns, no random number is drawn); free on the meta device."""
        training = self.training
        self.eval()
        blank = torch.zeros(1, self.options.in_chans, self.options.img_size, self.options.img_size, device=self.device)
        with torch.no_grad():
            _, features = self.encode(blank, [*range(self.num_layers + 1), -1], head=False)
        self.train(training)
        return ({layer: t.shape[-1] for layer, t in features.items()},
                {layer: t.shape[1] for layer, t in features.items()})

    def width(self, layer: int) -> int:
        return probed_at(self.widths, self.num_layers, layer)

    def positions(self, layer: int) -> int:
        """How many positions the features of ``layer`` have (per image)."""
        return probed_at(self.position_counts, self.num_layers, layer)

    def pixels(self, batch: Batch) -> Tensor:
        """The batch's images on this model's device and dtype, at its input size."""
        x = batch["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        side = self.options.img_size
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return x

    def encode(self, pixels: Tensor, layers: Sequence[int], head: bool) -> tuple[Tensor | None, dict[int, Tensor]]:
        """(the logits if ``head``, else None; the features [B, P, D] of ``layers``)."""
        def forward() -> Tensor:
            h = self.features_out(self.model.forward_features(pixels))
            return self.model.forward_head(h) if head else h

        out, captured = self._taps.run(forward, list(layers))
        return (out if head else None), {layer: self._positions(t) for layer, t in captured.items()}

    def _positions(self, t: Tensor) -> Tensor:
        """A tapped map or token sequence as [B, positions, width] (see the module docstring)."""
        if t.dim() == 4:
            return _flatten(self._resample(t.permute(0, 3, 1, 2) if self.channels_last else t))
        prefix, patches = t[:, :self.num_prefix_tokens], t[:, self.num_prefix_tokens:]
        if self.options.feature_grid:
            rows, cols = self._token_grid(patches.shape[1])
            grid = patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], rows, cols)
            patches = _flatten(self._resample(grid))
        return torch.cat([prefix, patches], 1) if self.options.prefix_tokens == "keep" else patches

    def _token_grid(self, count: int) -> tuple[int, int]:
        grid = tuple(getattr(getattr(self.model, "patch_embed", None), "grid_size", ()) or ())
        if len(grid) == 2 and grid[0] * grid[1] == count:
            return int(grid[0]), int(grid[1])
        side = math.isqrt(count)
        if side * side != count:
            raise ConfigError(f"options.feature_grid: {self.options.model_name} gives {count} patch tokens, "
                              "not a square grid to resample; set feature_grid: 0")
        return side, side

    def _resample(self, grid: Tensor) -> Tensor:
        side = self.options.feature_grid
        if not side or grid.shape[-2:] == (side, side):
            return grid
        return F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False, antialias=True)

    def forward(self, batch: Batch, layers: Sequence[int] = (), logits: bool = False) -> StudentOutput:  # type: ignore[override]
        out, features = self.encode(self.pixels(batch), layers, head=True)
        assert out is not None
        labels = batch.get("labels")
        loss = F.cross_entropy(out.float(), labels.to(out.device).long()) if labels is not None else out.new_zeros(())
        return StudentOutput(loss=loss, features=features, logits=out)

    def save_pretrained(self, directory: Path) -> None:
        """``model.safetensors`` (the timm model's weights) and ``timm_vision.json`` (its options)."""
        from safetensors.torch import save_model

        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.options), indent=2))


def _flatten(grid: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H * W, C], row by row."""
    return grid.flatten(2).transpose(1, 2)


class TimmVisionTeacher(FrozenTeacher):
    """A frozen timm model queried for per-position features and per-sample class logits."""

    logits_kind = "per_sample"

    def __init__(self, model: TimmVisionModel) -> None:
        super().__init__(model)
        self.num_layers, self.widths = model.num_layers, dict(model.widths)

    def width(self, layer: int) -> int:
        return probed_at(self.widths, self.num_layers, layer)

    def _forward(self, model: nn.Module, batch: Batch, layers: list[int], logits: bool) -> tuple[dict[int, Tensor], Tensor | None]:
        out, features = model.encode(model.pixels(batch), layers, head=logits)
        return features, out


# --------------------------------------------------------------------------- building


def _sized(options: TimmVisionOptions, data: DataInfo, key: str) -> TimmVisionOptions:
    """``options`` with classes and channels from the data where unset (set: they must agree)."""
    sizes = {}
    for name, reported in (("num_classes", data.num_classes), ("in_chans", data.num_channels)):
        given = getattr(options, name)
        if reported is not None and given not in (0, reported):
            raise ConfigError(f"{key}.options.{name}={given} but the data has {reported}; drop it or make them agree")
        sizes[name] = given or reported or 0
        if not sizes[name]:
            raise ConfigError(f"{key}.options.{name} is needed: the task does not report it")
    return dataclasses.replace(options, **sizes)


def _create(options: TimmVisionOptions, device: torch.device, key: str) -> nn.Module:
    timm = import_timm(f"{key}.kind=timm_vision")
    kwargs = {"pretrained": options.pretrained and device.type != "meta", "num_classes": options.num_classes,
              "in_chans": options.in_chans, **options.model_kwargs}
    with device:
        try:
            try:
                return timm.create_model(options.model_name, img_size=options.img_size, **kwargs)
            except TypeError as err:  # a model without a fixed input size (a CNN) takes no img_size
                if "img_size" not in str(err):
                    raise
                return timm.create_model(options.model_name, **kwargs)
        except (RuntimeError, TypeError) as err:  # an unknown name, or a keyword the model does not take
            raise ConfigError(f"{key}.options: timm cannot build {options.model_name!r}: {str(err).splitlines()[0]}") from None


def _load_weights(model: TimmVisionModel, folder: str, key: str) -> None:
    from safetensors.torch import load_file

    path = Path(resolve_path(folder, f"{key}.name_or_path")) / WEIGHTS_NAME
    if not path.is_file():
        raise MissingFile(f"{key}.name_or_path={folder}: no {WEIGHTS_NAME} there; give the final/ folder of an "
                          f"image_classify run, or drop {key}.name_or_path to have the teacher pre-trained")
    try:
        model.model.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise ModelLoadError(f"{key}.name_or_path={folder}: these weights do not fit {key}.options "
                             f"(model_name={model.options.model_name}): {str(err).splitlines()[0]}") from None


def _build(cfg: Any, key: str, device: str | torch.device, data: DataInfo) -> TimmVisionModel:
    device = torch.device(device)
    if cfg.source not in ("config", "checkpoint"):
        raise ConfigError(f"{key}.source={cfg.source!r}: kind timm_vision takes config (timm's initialisation, or "
                          "its hub weights with options.pretrained) or checkpoint (with name_or_path)")
    if cfg.source == "checkpoint" and not cfg.name_or_path:
        raise ConfigError(f"{key}.source=checkpoint needs {key}.name_or_path: a folder an image_classify run wrote")
    options = _sized(cfg.options, data, key)
    model = TimmVisionModel(_create(options, device, key), options)
    if cfg.source == "checkpoint" and device.type != "meta":  # `alignkit check` reads no weights
        _load_weights(model, cfg.name_or_path, key)
    return model


def build_timm_vision_student(cfg: Any, *, device: str | torch.device = "cpu", data: DataInfo = DataInfo()) -> TimmVisionModel:
    """The student ``cfg`` describes (see the module docstring)."""
    return _build(cfg, "student", device, data)


def build_timm_vision_teacher(cfg: Any, *, device: str | torch.device = "cpu", data: DataInfo = DataInfo()) -> TimmVisionTeacher:
    """A frozen teacher (usually ``source: checkpoint`` from an image_classify run), in ``cfg.dtype``."""
    model = _build(cfg, "teacher", device, data)
    return TimmVisionTeacher(model.to(getattr(torch, cfg.dtype)))


register_adapter("timm_vision", student=build_timm_vision_student, teacher=build_timm_vision_teacher,
                 options=TimmVisionOptions, weight_files=weight_files, teacher_from_student=TimmVisionTeacher)
