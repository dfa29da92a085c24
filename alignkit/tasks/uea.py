"""UEA multivariate time-series classification data (through aeon's ``load_classification``).

What :func:`load_uea` does, per dataset:

1. loads the official TRAIN and TEST splits (``load_equal_length=False``: unequal-length series
   stay unequal and are padded here; ``load_no_missing=True``: aeon's imputed ``_nmv`` copy when
   one exists; both flags passed explicitly since their defaults changed across aeon releases);
2. carves a validation set out of TRAIN -- stratified by class, deterministic by ``seed``; the
   TEST split is never used for anything but the final test metric;
3. fits per-channel normalisation (mean/std over *real* time steps, NaNs ignored) on the
   training part left after the carve-out, and applies it to train, val and test; padded steps
   and remaining NaNs become 0;
4. maps labels to indices: class names sorted (numerically when every name is a number, so
   "10" comes after "9"), the mapping kept in ``class_names``;
5. pads time to ``max_len`` (0 = the longest series over all splits; a longer series is cut to
   its first ``max_len`` steps) with a boolean mask [N, T] (True = real step). Real steps come
   first, padding at the end.

Several datasets (the paper's TimesNet teacher saw seven): each is loaded and normalised on its
own as above, then they are combined into one *joint label space*: channels are zero-padded to
the largest channel count, time to the longest length, and classes get dataset-prefixed names
(``"JapaneseVowels:3"``), dataset ``d``'s classes following dataset ``d-1``'s. One
classification head over the joint space serves every dataset; ``class_offsets`` /
``class_counts`` give each dataset's slice of it and every split carries ``dataset``
(the dataset index of each sample) so per-dataset accuracy (restricted to the dataset's own
classes, if wanted) can be computed.

Batches are dicts ``{"x": [B, T, C] float32, "attention_mask": [B, T] long, "labels": [B] long}``
(plus ``"dataset": [B]`` when several datasets are combined). :meth:`UEASplits.train_batches`
gives an endless stream of shuffled micro-batches with an exactly resumable position
(the permutation of epoch ``e`` comes from ``seed + e``); :meth:`UEASplits.eval_batches` gives
the validation or test split in order.

Offline, aeon ships the multivariate JapaneseVowels (12 channels, unequal lengths) and
BasicMotions (6 channels), and the univariate (1-channel) UCR sets ACSF1, ArrowHead, GunPoint,
ItalyPowerDemand, OSULeaf, PickupGestureWiimoteZ (unequal lengths) and UnitTest; any other
dataset needs a local copy of the archive under ``extract_path``
(``<extract_path>/<Name>/<Name>_TRAIN.ts`` and ``_TEST.ts``) or network access.
:func:`describe_uea` reads only the ``.ts`` headers (what ``alignkit check`` needs).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from alignkit.core.adapter import DataInfo
from alignkit.core.config import above, at_least, between, checked
from alignkit.core.errors import ConfigError, DataError

__all__ = ["UEADataConfig", "UEASplits", "TSSplit", "UEABatches", "UEADataError", "load_uea",
           "load_uea_dataset", "dataset_available", "describe_uea"]

_SOURCES_HINT = (
    "Get the UEA archive on a machine with network access (e.g. "
    "`python -c \"from aeon.datasets import load_classification as f; "
    "f('{name}', extract_path='uea')\"`, or download Multivariate2018_ts.zip from "
    "https://www.timeseriesclassification.com), copy it here so that "
    "<extract_path>/{name}/{name}_TRAIN.ts and {name}_TEST.ts exist, and set "
    "extract_path (the config key task.uea.extract_path) to that folder."
)


class UEADataError(DataError):
    """A UEA dataset could not be loaded (not shipped, not under extract_path, offline)."""


@dataclass
class UEADataConfig:
    datasets: list[str] = field(default_factory=lambda: ["JapaneseVowels"])
    extract_path: str = ""  # local UEA copy: <extract_path>/<Name>/<Name>_TRAIN.ts
    val_fraction: float = checked(0.2, between(0, 1, high_open=True))  # carved from TRAIN, stratified, by seed; never from TEST
    seed: int = 0
    max_len: int = checked(0, at_least(0))  # 0 = longest series in the data
    download: bool = True  # False: never let aeon try the network (fail fast when not local)
    # training-batch augmentation (val/test never): each series is cut to a random contiguous
    # window of at least crop_min of its real steps (1.0 = off), then Gaussian noise of std
    # jitter (in normalised units) is added to its real steps
    crop_min: float = checked(1.0, above(0))
    jitter: float = checked(0.0, at_least(0))


@dataclass
class TSSplit:
    """One split: ``x`` [N, T, C] float32, ``mask`` [N, T] bool (True = real), ``y`` [N] long,
    ``dataset`` [N] long (index into ``UEASplits.datasets``)."""

    x: Tensor
    mask: Tensor
    y: Tensor
    dataset: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)

    def subset(self, index: Tensor) -> "TSSplit":
        return TSSplit(self.x[index], self.mask[index], self.y[index], self.dataset[index])


def augment_batch(batch: dict[str, Tensor], crop_min: float, jitter: float,
                  generator: torch.Generator) -> dict[str, Tensor]:
    """Random contiguous crop (kept fraction uniform in [crop_min, 1]) moved to the front, then
    jitter on real steps; padding stays zero and the mask follows the crop."""
    x, mask = batch["x"].clone(), batch["attention_mask"].clone()
    if crop_min < 1.0:
        for i, length in enumerate(mask.sum(1).tolist()):
            keep = float(torch.empty(()).uniform_(crop_min, 1.0, generator=generator))
            size = max(1, min(length, math.ceil(length * keep)))
            start = int(torch.randint(0, length - size + 1, (), generator=generator))
            window = x[i, start:start + size].clone()
            x[i].zero_()
            mask[i].zero_()
            x[i, :size], mask[i, :size] = window, 1
    if jitter > 0:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + jitter * noise * mask[..., None].to(x.dtype)
    return {**batch, "x": x, "attention_mask": mask}


def _batch_dict(split: TSSplit, index: Tensor, trim: bool, with_dataset: bool) -> dict[str, Tensor]:
    x, mask = split.x[index], split.mask[index]
    if trim and len(index):
        longest = max(int(mask.sum(1).max()), 1)
        x, mask = x[:, :longest], mask[:, :longest]
    batch = {"x": x.contiguous(), "attention_mask": mask.long(), "labels": split.y[index]}
    if with_dataset:
        batch["dataset"] = split.dataset[index]
    return batch


class UEABatches:
    """Endless shuffled micro-batches over a split, resumable exactly.

    Epoch ``e`` visits the samples in ``randperm(N, generator=seed + e)``; the position is
    (epoch, offset into that permutation). ``state_dict()`` after yielding k batches and
    ``load_state_dict`` on a fresh iterator continue with batch k+1."""

    def __init__(self, split: TSSplit, batch_size: int, seed: int = 0, drop_last: bool = False,
                 trim: bool = False, with_dataset: bool = False, crop_min: float = 1.0,
                 jitter: float = 0.0) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if len(split) == 0:
            raise ConfigError("cannot draw training batches from an empty split")
        if drop_last and len(split) < batch_size:
            raise ConfigError(f"drop_last with batch_size={batch_size} > {len(split)} samples")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.drop_last, self.trim, self.with_dataset = drop_last, trim, with_dataset
        if not 0.0 < crop_min <= 1.0 or jitter < 0:
            raise ConfigError(f"uea.crop_min={crop_min} must be in (0, 1] and uea.jitter={jitter} >= 0")
        self.crop_min, self.jitter = crop_min, jitter
        self.epoch, self.offset = 0, 0

    def _order(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.split), generator=generator)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        n = len(self.split)
        remaining = n - self.offset
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch, self.offset = self.epoch + 1, 0
        order = self._order(self.epoch)
        index = order[self.offset:self.offset + self.batch_size]
        batch = _batch_dict(self.split, index, self.trim, self.with_dataset)
        if self.crop_min < 1.0 or self.jitter > 0:  # a function of the position: resume stays exact
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.offset)))
            batch = augment_batch(batch, self.crop_min, self.jitter, generator)
        self.offset += len(index)
        return batch

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "batch_size": self.batch_size, "num_samples": len(self.split)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_samples", len(self.split))) != len(self.split):
            raise DataError(f"batch state is for {state['num_samples']} samples, split has {len(self.split)}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.seed = int(state.get("seed", self.seed))


@dataclass
class UEASplits:
    """Loaded, normalised, padded data of one or several UEA datasets (see module docstring)."""

    train: TSSplit
    val: TSSplit
    test: TSSplit
    class_names: list[str]
    datasets: list[str]
    class_offsets: list[int]  # dataset d's classes are [offset_d, offset_d + count_d)
    class_counts: list[int]
    channels: list[int]  # each dataset's own channel count (before channel padding)
    norm_mean: list[Tensor]  # per dataset [C_d], fitted on its training part only
    norm_std: list[Tensor]
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        return int(self.train.x.shape[2])

    @property
    def seq_len(self) -> int:
        return int(self.train.x.shape[1])

    def split(self, name: str) -> TSSplit:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split={name!r} is not train, val or test")
        return getattr(self, name)

    def train_batches(self, batch_size: int, drop_last: bool = False, trim: bool = False,
                      crop_min: float = 1.0, jitter: float = 0.0) -> UEABatches:
        """Shuffled micro-batches of the training part (endless; resumable via state_dict).
        ``trim`` cuts each batch to its longest real series (less compute for long padding);
        ``crop_min`` / ``jitter`` augment them (see :class:`UEADataConfig`)."""
        return UEABatches(self.train, batch_size, seed=self.seed, drop_last=drop_last, trim=trim,
                          with_dataset=len(self.datasets) > 1, crop_min=crop_min, jitter=jitter)

    def eval_batches(self, split: str = "val", batch_size: int = 64,
                     trim: bool = False) -> Iterator[dict[str, Tensor]]:
        """The ``val`` or ``test`` (or ``train``) split in order, once."""
        data = self.split(split)
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            yield _batch_dict(data, index, trim, len(self.datasets) > 1)

    def data_info(self) -> DataInfo:
        """What the model builders need to know of these series."""
        return DataInfo(num_classes=self.num_classes, num_channels=self.num_channels, seq_len=self.seq_len,
                        class_names=tuple(self.class_names), datasets=tuple(self.datasets))

    def info(self) -> dict[str, Any]:
        """Options a model builder needs (``num_classes``, ``num_channels``, ``seq_len``, ...)."""
        return {"num_classes": self.num_classes, "num_channels": self.num_channels,
                "seq_len": self.seq_len, "class_names": list(self.class_names),
                "datasets": list(self.datasets)}


# --------------------------------------------------------------------------- loading


def _aeon_roots() -> list[str]:
    """Where aeon looks without an extract_path: its bundled data, then its download cache."""
    roots = []
    try:
        import aeon.datasets._data_loaders as loaders

        roots.append(os.path.join(loaders.MODULE, "data"))
        roots.append(loaders._get_data_home())
    except (ImportError, AttributeError):  # private layout changed: let aeon decide
        pass
    return roots


def _has_files(root: str, name: str) -> bool:
    folder = os.path.join(root, name)
    return all(os.path.isfile(os.path.join(folder, f"{name}_{s}.ts")) for s in ("TRAIN", "TEST"))


def dataset_available(name: str, extract_path: str = "") -> bool:
    """True when ``name`` can be loaded without the network (shipped, cached or under
    ``extract_path``). aeon with an explicit extract_path looks only there."""
    roots = [os.path.abspath(os.path.expanduser(extract_path))] if extract_path else _aeon_roots()
    return any(_has_files(root, name) for root in roots)


def _header(path: str) -> dict[str, str]:
    """The ``@key value`` lines of a ``.ts`` file, up to ``@data`` (keys lower-cased)."""
    found = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line.lower().startswith("@data"):
                break
            if line.startswith("@"):
                key, _, value = line[1:].partition(" ")
                found[key.lower()] = value.strip()
    return found


def describe_uea(cfg: UEADataConfig) -> tuple[DataInfo | None, list[str]]:
    """What :meth:`UEASplits.data_info` would report, from the TRAIN file headers only (no
    series read, no download): classes, channels, and the length when the set declares one
    (``max_len`` when set). (None, a note) when a dataset is not local."""
    names: list[str] = []
    channels, lengths = [], []
    for name in cfg.datasets:
        roots = [os.path.abspath(os.path.expanduser(cfg.extract_path))] if cfg.extract_path else _aeon_roots()
        root = next((r for r in roots if _has_files(r, name)), None)
        if root is None:
            return None, [f"UEA dataset {name!r} is not local: classes and channels not read (task.uea.extract_path)"]
        header = _header(os.path.join(root, name, f"{name}_TRAIN.ts"))
        labels = header.get("classlabel", "").split()[1:]  # "true 1 2 3"
        if not labels:
            raise UEADataError(f"{os.path.join(root, name, name + '_TRAIN.ts')}: no @classLabel in the header")
        univariate = header.get("univariate", "true").lower() == "true"
        channels.append(1 if univariate else int(header.get("dimensions", "1")))
        lengths.append(int(header["serieslength"]) if "serieslength" in header else 0)
        ordered = _class_order(labels)
        names += [f"{name}:{c}" for c in ordered] if len(cfg.datasets) > 1 else ordered
    length = cfg.max_len or (max(lengths) if all(lengths) else None)
    return DataInfo(num_classes=len(names), num_channels=max(channels), seq_len=length,
                    class_names=tuple(names), datasets=tuple(cfg.datasets)), []


def _aeon_load(name: str, split: str, extract_path: str | None) -> tuple[Any, np.ndarray]:
    from aeon.datasets import load_classification

    return load_classification(name, split=split, extract_path=extract_path,
                               load_equal_length=False, load_no_missing=True, return_metadata=False)


def _load_raw(name: str, extract_path: str, download: bool) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    local = dataset_available(name, extract_path)
    where = f"extract_path={extract_path!r}" if extract_path else "no extract_path set"
    if not local and not download:
        raise UEADataError(
            f"UEA dataset {name!r} is not available offline ({where}; aeon ships only "
            f"a few sets: see alignkit.tasks.uea) and download=False. "
            + _SOURCES_HINT.format(name=name)
        )
    out = {}
    for split in ("train", "test"):
        try:
            x, y = _aeon_load(name, split, extract_path or None)
        except Exception as err:  # aeon raises ValueError/URLError/OSError when offline
            raise UEADataError(
                f"UEA dataset {name!r} could not be loaded ({where}; "
                f"{'found locally' if local else 'not found locally, download failed'}): "
                f"{type(err).__name__}: {err}. " + _SOURCES_HINT.format(name=name)
            ) from err
        series = [np.asarray(s, dtype=np.float64) for s in x]  # each (C, T_i)
        series = [s[None, :] if s.ndim == 1 else s for s in series]
        out[split] = (series, np.asarray(y).astype(str))
    return out


def _class_order(names: Sequence[str]) -> list[str]:
    unique = sorted({str(n) for n in names})
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


def _stratified_val(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the validation part: per class round(n_c * fraction), at least one per class
    when fraction > 0 and the class has >= 2 samples, never the whole class."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    if fraction >= 1:
        raise ConfigError(f"val_fraction={fraction} must be < 1")
    rng = np.random.RandomState(seed)
    val = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        take = int(round(len(members) * fraction))
        take = min(max(take, 1 if len(members) >= 2 else 0), len(members) - 1)
        val.extend(rng.permutation(members)[:take].tolist())
    return np.sort(np.asarray(val, dtype=np.int64))


def _pad(series: list[np.ndarray], length: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((len(series), length, channels), dtype=np.float32)
    mask = np.zeros((len(series), length), dtype=bool)
    for i, s in enumerate(series):
        t = min(s.shape[1], length)
        x[i, :t, : s.shape[0]] = s[:, :t].T
        mask[i, :t] = True
    return x, mask


@dataclass
class _One:
    name: str
    parts: dict[str, tuple[list[np.ndarray], np.ndarray]]  # split -> (normalised series, labels)
    classes: list[str]
    channels: int
    longest: int
    mean: np.ndarray
    std: np.ndarray


def _prepare(name: str, cfg: UEADataConfig) -> _One:
    raw = _load_raw(name, cfg.extract_path, cfg.download)
    train_x, train_y = raw["train"]
    test_x, test_y = raw["test"]
    channels = {s.shape[0] for s in train_x + test_x}
    if len(channels) != 1:
        raise UEADataError(f"UEA dataset {name!r}: series have different channel counts {sorted(channels)}")
    val_idx = _stratified_val(train_y, cfg.val_fraction, cfg.seed)
    is_val = np.zeros(len(train_y), dtype=bool)
    is_val[val_idx] = True
    fit = [train_x[i] for i in np.flatnonzero(~is_val)]
    steps = np.concatenate(fit, axis=1)  # (C, sum of real lengths): training part only
    with np.errstate(all="ignore"):
        mean = np.nanmean(steps, axis=1)
        std = np.nanstd(steps, axis=1)
    mean = np.nan_to_num(mean)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)

    def norm(xs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.nan_to_num((s - mean[:, None]) / std[:, None]) for s in xs]

    parts = {
        "train": (norm([train_x[i] for i in np.flatnonzero(~is_val)]), train_y[~is_val]),
        "val": (norm([train_x[i] for i in val_idx]), train_y[val_idx]),
        "test": (norm(test_x), test_y),
    }
    longest = max(s.shape[1] for s in train_x + test_x)
    return _One(name, parts, _class_order(list(train_y) + list(test_y)), channels.pop(), longest, mean, std)


def load_uea(cfg: UEADataConfig) -> UEASplits:
    """Load, split, normalise and pad ``cfg.datasets`` (several -> joint label space)."""
    if not cfg.datasets:
        raise ConfigError("UEADataConfig.datasets is empty")
    names = list(cfg.datasets)
    if len(set(names)) != len(names):
        raise ConfigError(f"datasets lists a name twice: {names}")
    ones = [_prepare(name, cfg) for name in names]
    length = cfg.max_len if cfg.max_len > 0 else max(o.longest for o in ones)
    channels = max(o.channels for o in ones)
    joint = len(ones) > 1
    class_names: list[str] = []
    offsets, counts = [], []
    for o in ones:
        offsets.append(len(class_names))
        counts.append(len(o.classes))
        class_names += [f"{o.name}:{c}" for c in o.classes] if joint else list(o.classes)

    def build(split: str) -> TSSplit:
        xs, masks, ys, ds = [], [], [], []
        for d, (o, offset) in enumerate(zip(ones, offsets)):
            series, labels = o.parts[split]
            x, mask = _pad(series, length, channels)
            index = {c: i for i, c in enumerate(o.classes)}
            xs.append(x)
            masks.append(mask)
            ys.append(np.asarray([offset + index[c] for c in labels], dtype=np.int64))
            ds.append(np.full(len(labels), d, dtype=np.int64))
        return TSSplit(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(masks)),
                       torch.from_numpy(np.concatenate(ys)), torch.from_numpy(np.concatenate(ds)))

    return UEASplits(
        train=build("train"), val=build("val"), test=build("test"),
        class_names=class_names, datasets=names, class_offsets=offsets, class_counts=counts,
        channels=[o.channels for o in ones],
        norm_mean=[torch.from_numpy(o.mean.astype(np.float32)) for o in ones],
        norm_std=[torch.from_numpy(o.std.astype(np.float32)) for o in ones],
        seed=cfg.seed,
    )


def load_uea_dataset(name: str, **kwargs: Any) -> UEASplits:
    """Shorthand: ``load_uea(UEADataConfig(datasets=[name], **kwargs))``."""
    return load_uea(UEADataConfig(datasets=[name], **kwargs))
