"""Image classification data: loading, splits, normalisation and augmented training batches.

Sources (``task.data.source``):

* ``digits``: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``, shipped inside
  the package: offline), 1,797 grey 8 x 8 images of 10 classes, upsampled to ``image_size``;
* ``folder``: your own images, ``<path>/train/<class>/*`` and optionally ``<path>/test/<class>/*``
  (torchvision's ``ImageFolder`` layout: classes are the sorted folder names; images are read as
  RGB and resized to ``image_size``). All images are held in memory.

Splits: a source without a test split of its own (digits, a folder without ``test/``) gives
``test_fraction`` of every class to test, always with seed 0, so every run on it is tested on
the same images; validation is then carved from the training part, stratified by class, by
``seed``; the test split is used for nothing but the final test. Per-channel mean and std are
fitted on the training part left after the carve-out and applied to every split.

Batches: ``{"pixel_values": [B, C, S, S] float32, "labels": [B] long}``; training batches also
carry an all-ones ``attention_mask`` [B, P] over the student's feature positions (see
:meth:`~alignkit.tasks.image_classify.ImageClassifyTask.check_student`). Training batches are
an endless shuffled stream (:class:`ImageBatches`) augmented with ``torchvision.transforms.v2``
(random rotation and translation, image by image); validation and test batches are not augmented.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from alignkit.adapters.vision_imports import import_torchvision, import_transforms_v2
from alignkit.core.adapter import DataInfo
from alignkit.core.config import at_least, between, checked, one_of
from alignkit.core.errors import DataError, MissingFile
from alignkit.tasks.uea import TSSplit, UEABatches

SOURCES = ("digits", "folder")
TEST_SEED = 0  # the carved test split is the same for every run seed
FOLDER_CHANNELS = 3  # ImageFolder reads RGB


@dataclass
class ImageDataConfig:
    """``task.data`` of ``image_classify``."""

    source: str = checked("digits", one_of(*SOURCES))
    path: str = ""  # source folder: <path>/train/<class>/* (and optionally <path>/test/<class>/*)
    image_size: int = checked(32, at_least(1))  # side of the square images the batches carry
    val_fraction: float = checked(0.2, between(0, 1, high_open=True))  # carved from train, stratified, by seed
    test_fraction: float = checked(0.2, between(0, 1, high_open=True))  # where the source has no test split
    seed: int = checked(0, at_least(0))  # the validation carve-out and the training order
    rotate: float = checked(10.0, between(0, 180))  # training augmentation: degrees of random rotation
    translate: float = checked(0.1, between(0, 1))  # training augmentation: random shift, a fraction of the side


@dataclass
class ImageSet:
    """One split: ``images`` [N, C, S, S] float32 in [0, 1], ``labels`` [N] long."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class ImageSplits:
    """Train, validation and test images of one source (see the module docstring)."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: list[str]
    source: str
    normalize: Callable[[Tensor], Tensor]
    augment: Callable[[Tensor], Tensor] | None
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        return int(self.train.images.shape[1])

    def train_batches(self, batch_size: int, mask_positions: int = 1) -> "ImageBatches":
        return ImageBatches(self, batch_size, mask_positions)

    def eval_batches(self, split: str = "val", batch_size: int = 64) -> Iterator[dict[str, Tensor]]:
        """The ``val`` or ``test`` split in order, once, not augmented."""
        data: ImageSet = getattr(self, split)
        for start in range(0, len(data), batch_size):
            part = data.subset(torch.arange(start, min(start + batch_size, len(data))))
            yield {"pixel_values": self.normalize(part.images), "labels": part.labels}

    def data_info(self) -> DataInfo:
        return DataInfo(num_classes=self.num_classes, num_channels=self.num_channels,
                        class_names=tuple(self.class_names), datasets=(self.source,))

    def info(self) -> dict[str, Any]:
        """What the exported model was trained on (``task.json``)."""
        return {"source": self.source, "num_classes": self.num_classes, "num_channels": self.num_channels,
                "image_size": int(self.train.images.shape[-1]), "class_names": self.class_names}


class ImageBatches:
    """Endless shuffled, augmented micro-batches of the training images, resumable exactly: order
    and position are those of a :class:`~alignkit.tasks.uea.UEABatches` over the sample indices
    (epoch ``e`` visits ``randperm(N)`` seeded ``seed + e``), and a batch's augmentation is drawn
    from a seed that is a function of that position. ``attention_mask`` [B, ``mask_positions``]
    is all ones (the positions of the student's features; see the module docstring)."""

    def __init__(self, splits: ImageSplits, batch_size: int, mask_positions: int = 1) -> None:
        n = len(splits.train)
        indices = TSSplit(x=torch.arange(n)[:, None, None], mask=torch.ones(n, 1, dtype=torch.bool),
                          y=splits.train.labels, dataset=torch.zeros(n, dtype=torch.long))
        self.splits, self.order = splits, UEABatches(indices, batch_size, seed=splits.seed)
        self.mask_positions = mask_positions

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        drawn = next(self.order)
        images = self.splits.train.images[drawn["x"].flatten()]
        if self.splits.augment is not None:
            position = hash((self.order.seed, self.order.epoch, self.order.offset)) % 2**63
            with torch.random.fork_rng(devices=[]):  # transforms.v2 draws from the global generator
                torch.manual_seed(position)
                images = torch.stack([self.splits.augment(image) for image in images])
        mask = torch.ones(len(images), self.mask_positions, dtype=torch.long)
        return {"pixel_values": self.splits.normalize(images), "labels": drawn["labels"], "attention_mask": mask}

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


# --------------------------------------------------------------------------- loading


def stratified_split(labels: Tensor, fraction: float, seed: int, what: str) -> tuple[Tensor, Tensor]:
    """(kept, carved) sorted indices: ``fraction`` of every class carved out by ``seed``
    (scikit-learn's stratified ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    try:
        kept, carved = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels.numpy(),
                                        random_state=seed)
    except ValueError as err:
        raise DataError(f"task.data.{what}={fraction}: cannot carve it from {len(labels)} images by class: {err}") from None
    return torch.as_tensor(np.sort(kept)), torch.as_tensor(np.sort(carved))


def _digits() -> tuple[ImageSet, ImageSet | None, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # 0..16 grey levels
    return ImageSet(images, torch.as_tensor(digits.target, dtype=torch.long)), None, [str(n) for n in digits.target_names]


def _image_folder(root: Path, size: int) -> tuple[ImageSet, list[str]]:
    v2 = import_transforms_v2("task.data.source=folder")
    datasets = import_torchvision("task.data.source=folder").datasets
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((size, size))])
    dataset = datasets.ImageFolder(str(root), transform=to_tensor)
    if not len(dataset):
        raise DataError(f"task.data.path: no images under {root}/<class>/")
    images = torch.stack([image for image, _ in dataset])
    return ImageSet(images, torch.as_tensor(dataset.targets, dtype=torch.long)), list(dataset.classes)


def _folder(cfg: ImageDataConfig) -> tuple[ImageSet, ImageSet | None, list[str]]:
    train_root, test_root = Path(cfg.path) / "train", Path(cfg.path) / "test"
    if not train_root.is_dir():
        raise MissingFile(f"task.data.path={cfg.path!r}: no train/ folder there (expected <path>/train/<class>/*)")
    train, classes = _image_folder(train_root, cfg.image_size)
    if not test_root.is_dir():
        return train, None, classes
    test, test_classes = _image_folder(test_root, cfg.image_size)
    if test_classes != classes:
        raise DataError(f"task.data.path={cfg.path!r}: test/ has classes {test_classes}, train/ has {classes}")
    return train, test, classes


def folder_classes(cfg: ImageDataConfig) -> list[str]:
    """The class names of a folder source, from its folder names alone (what ``check`` needs)."""
    root = Path(cfg.path) / "train"
    if not root.is_dir():
        raise MissingFile(f"task.data.path={cfg.path!r}: no train/ folder there (expected <path>/train/<class>/*)")
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def load_images(cfg: ImageDataConfig) -> ImageSplits:
    """Load, split, fit the normalisation and set up the augmentation (module docstring)."""
    v2 = import_transforms_v2("task.name=image_classify")
    train, test, classes = _digits() if cfg.source == "digits" else _folder(cfg)
    if test is None:
        kept, carved = stratified_split(train.labels, cfg.test_fraction, TEST_SEED, "test_fraction")
        train, test = train.subset(kept), train.subset(carved)
    kept, carved = stratified_split(train.labels, cfg.val_fraction, cfg.seed, "val_fraction")
    train, val = train.subset(kept), train.subset(carved)
    resize = v2.Resize((cfg.image_size, cfg.image_size))
    train, val, test = (ImageSet(resize(part.images), part.labels) for part in (train, val, test))
    mean, std = train.images.mean((0, 2, 3)), train.images.std((0, 2, 3)).clamp(min=1e-6)
    augment = None
    if cfg.rotate or cfg.translate:
        augment = v2.RandomAffine(degrees=cfg.rotate, translate=(cfg.translate, cfg.translate))
    return ImageSplits(train, val, test, classes, cfg.source, v2.Normalize(mean.tolist(), std.tolist()), augment,
                       seed=cfg.seed)
