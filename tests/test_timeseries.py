"""UEA loading, TimesNet (student/teacher, save/load) and the HF-decoder time-series student.

Offline and CPU-only: JapaneseVowels and BasicMotions ship with aeon; models are tiny."""
from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("aeon")

import alignkit.adapters  # noqa: F401  (registers the adapters)
from alignkit.adapters import timesnet as tn
from alignkit.core.config import ModelConfig
from alignkit.core.adapter import DataInfo
from alignkit.core.registry import build_student, build_teacher
from alignkit.tasks import uea
from alignkit.tasks.uea import UEADataConfig, UEADataError, load_uea

_real_aeon_load = uea._aeon_load


@pytest.fixture(scope="module", autouse=True)
def cached_aeon():
    """Parse each shipped .ts file once for the whole module (aeon's parser takes ~1 s)."""
    cached = functools.lru_cache(maxsize=None)(_real_aeon_load)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uea, "_aeon_load", cached)
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a shared 2-core machine: intra-op threads spin against other
    processes and run 10-100x slower than on one thread (measured), so use one here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def jv():
    return load_uea(UEADataConfig(datasets=["JapaneseVowels"], seed=0))


def _batch(b: int = 4, t: int = 20, c: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, 7, 13, 16, 9, 20][:b]).clamp(max=t)
    mask = torch.arange(t)[None] < lengths[:, None]
    x = torch.randn(b, t, c, generator=g) * mask[..., None]
    return {"x": x, "attention_mask": mask.long(), "labels": torch.arange(b) % 3}


def _extra_padding(batch, extra: int = 10, fill: float = 7.0):
    """The same series padded ``extra`` steps longer, with garbage at every padded step."""
    x = F.pad(batch["x"], (0, 0, 0, extra))
    mask = F.pad(batch["attention_mask"], (0, extra))
    x[mask == 0] = fill
    return {"x": x, "attention_mask": mask, "labels": batch["labels"]}


# --------------------------------------------------------------------------- UEA loader


def test_japanese_vowels_shapes(jv):
    assert (len(jv.train) + len(jv.val), len(jv.test)) == (270, 370)
    assert (jv.num_classes, jv.num_channels, jv.seq_len) == (9, 12, 29)
    assert jv.class_names == [str(i) for i in range(1, 10)]
    for split in (jv.train, jv.val, jv.test):
        assert split.x.dtype == torch.float32 and split.mask.dtype == torch.bool
        assert split.y.dtype == torch.long and split.x.shape == (len(split), 29, 12)
        assert split.mask.shape == (len(split), 29)
        # real steps first, padding after; padded steps are zero
        lengths = split.lengths
        assert torch.equal(split.mask, torch.arange(29)[None] < lengths[:, None])
        assert split.x[~split.mask].abs().max() == 0
        assert int(split.y.min()) >= 0 and int(split.y.max()) <= 8
    all_lengths = torch.cat([s.lengths for s in (jv.train, jv.val, jv.test)])
    assert int(all_lengths.min()) == 7 and int(all_lengths.max()) == 29
    assert set(torch.cat([jv.train.y, jv.test.y]).tolist()) == set(range(9))
    # validation: stratified, 20 % of each class's 30 training series
    assert torch.bincount(jv.val.y, minlength=9).tolist() == [6] * 9


def test_normalisation_fitted_on_training_part_only(jv):
    real = jv.train.x[jv.train.mask]  # [steps, C]
    assert torch.allclose(real.mean(0), torch.zeros(12), atol=1e-5)
    assert torch.allclose(real.std(0, unbiased=False), torch.ones(12), atol=1e-4)
    # validation and test use the same statistics, so they are not exactly standardised
    assert not torch.allclose(jv.test.x[jv.test.mask].mean(0), torch.zeros(12), atol=1e-3)

    original = uea._aeon_load
    raw_train_y = np.asarray(original("JapaneseVowels", "train", None)[1]).astype(str)
    val_index = set(uea._stratified_val(raw_train_y, 0.2, 0).tolist())

    def tampered(name, split, extract_path):
        x, y = original(name, split, extract_path)
        x = [np.array(s, dtype=np.float64) for s in x]
        for i in range(len(x)):
            if split == "test" or i in val_index:
                x[i] = x[i] * 100.0 + 50.0
        return x, y

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uea, "_aeon_load", tampered)
        other = load_uea(UEADataConfig(datasets=["JapaneseVowels"], seed=0))
    assert torch.equal(other.norm_mean[0], jv.norm_mean[0])
    assert torch.equal(other.norm_std[0], jv.norm_std[0])
    assert torch.equal(other.train.x, jv.train.x)
    assert not torch.equal(other.test.x, jv.test.x)


def test_validation_split_is_deterministic_and_disjoint(jv):
    again = load_uea(UEADataConfig(datasets=["JapaneseVowels"], seed=0))
    assert torch.equal(again.val.x, jv.val.x) and torch.equal(again.train.y, jv.train.y)
    other = load_uea(UEADataConfig(datasets=["JapaneseVowels"], seed=1))
    assert not torch.equal(other.val.x, jv.val.x)
    train_rows = {tuple(r.tolist()) for r in jv.train.x.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in jv.val.x.flatten(1))
    none = load_uea(UEADataConfig(datasets=["JapaneseVowels"], val_fraction=0.0))
    assert len(none.val) == 0 and len(none.train) == 270


def test_max_len_pads_and_truncates():
    longer = load_uea(UEADataConfig(datasets=["JapaneseVowels"], max_len=40))
    assert longer.seq_len == 40 and int(longer.test.lengths.max()) == 29
    shorter = load_uea(UEADataConfig(datasets=["JapaneseVowels"], max_len=10))
    assert shorter.seq_len == 10 and int(shorter.train.lengths.max()) == 10


def test_train_batches_shuffle_cover_and_resume(jv):
    batches = jv.train_batches(32)
    first = next(batches)
    assert set(first) == {"x", "attention_mask", "labels"}
    assert first["x"].shape == (32, 29, 12) and first["attention_mask"].shape == (32, 29)
    assert first["labels"].dtype == torch.long
    # one epoch visits every training series once
    labels = [first["labels"]] + [next(batches)["labels"] for _ in range(batches.batches_per_epoch - 1)]
    assert torch.equal(torch.bincount(torch.cat(labels), minlength=9), torch.bincount(jv.train.y, minlength=9))
    # resume: a fresh iterator continues exactly where the state was taken (across epochs)
    for _ in range(3):
        next(batches)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(9)]
    resumed = jv.train_batches(32)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # a new epoch is a new permutation, reproducible from the seed
    a, b = jv.train_batches(32), jv.train_batches(32)
    assert torch.equal(next(a)["x"], next(b)["x"])
    trimmed = next(jv.train_batches(8, trim=True))
    assert trimmed["x"].shape[1] == int(trimmed["attention_mask"].sum(1).max())


def test_eval_batches_in_order(jv):
    val = list(jv.eval_batches("val", batch_size=20))
    assert torch.equal(torch.cat([b["labels"] for b in val]), jv.val.y)
    test = list(jv.eval_batches("test", batch_size=100))
    assert [len(b["labels"]) for b in test] == [100, 100, 100, 70]
    with pytest.raises(ValueError):
        list(jv.eval_batches("dev"))


def test_basic_motions_loads():
    bm = load_uea(UEADataConfig(datasets=["BasicMotions"]))
    assert (bm.num_classes, bm.num_channels, bm.seq_len) == (4, 6, 100)
    assert bm.class_names == ["badminton", "running", "standing", "walking"]
    assert len(bm.train) + len(bm.val) == 40 and len(bm.test) == 40
    assert bool(bm.train.mask.all())


def test_extract_path_local_copy(tmp_path):
    import aeon.datasets._data_loaders as loaders

    shutil.copytree(os.path.join(loaders.MODULE, "data", "BasicMotions"), tmp_path / "BasicMotions")
    assert uea.dataset_available("BasicMotions", str(tmp_path))
    assert not uea.dataset_available("Heartbeat", str(tmp_path))
    bm = load_uea(UEADataConfig(datasets=["BasicMotions"], extract_path=str(tmp_path), download=False))
    assert bm.num_channels == 6


def test_several_datasets_share_one_label_space():
    both = load_uea(UEADataConfig(datasets=["JapaneseVowels", "BasicMotions"]))
    assert (both.num_classes, both.num_channels, both.seq_len) == (13, 12, 100)
    assert both.class_names[0] == "JapaneseVowels:1" and both.class_names[9] == "BasicMotions:badminton"
    assert both.class_offsets == [0, 9] and both.class_counts == [9, 4] and both.channels == [12, 6]
    bm = both.test.dataset == 1
    assert bool((both.test.y[bm] >= 9).all()) and bool((both.test.y[~bm] < 9).all())
    assert both.test.x[bm][..., 6:].abs().max() == 0  # BasicMotions' missing channels are zero
    batch = next(both.train_batches(16))
    assert batch["dataset"].shape == (16,)


def test_missing_dataset_offline_fails_fast_and_clearly(monkeypatch):
    def no_network(*_args, **_kwargs):
        raise AssertionError("aeon must not be asked (it would try to download)")

    monkeypatch.setattr(uea, "_aeon_load", no_network)
    with pytest.raises(UEADataError, match="Heartbeat") as err:
        load_uea(UEADataConfig(datasets=["Heartbeat"], download=False))
    assert "extract_path" in str(err.value)

    def offline(name, split, extract_path):
        raise ValueError(f"Could not download files for {name} from Zenodo: Name or service not known")

    monkeypatch.setattr(uea, "_aeon_load", offline)
    with pytest.raises(UEADataError, match="Heartbeat") as err:
        load_uea(UEADataConfig(datasets=["Heartbeat"]))
    assert "extract_path" in str(err.value) and "Could not download" in str(err.value)


# --------------------------------------------------------------------------- TimesNet


def _timesnet(**overrides):
    torch.manual_seed(0)
    return tn.TimesNetClassifier(num_channels=12, num_classes=3, **overrides)


def test_timesnet_shapes_and_backward():
    model = _timesnet()
    assert model.num_layers == 2 and model.width(-1) == 32 and model.width(0) == 32
    batch = _batch()
    out = model(batch, [0, 1, 2, -1])
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
    for layer in (0, 1, 2, -1):
        assert out.features[layer].shape == (4, 20, 32)
        padded = batch["attention_mask"] == 0
        assert out.features[layer][padded].abs().max() == 0  # zeros at padded steps
    out.loss.backward()
    assert model.head.weight.grad is not None and model.embedding.token.weight.grad is not None
    # series shorter than 2 * top_k (few frequencies) still work
    short = model({"x": torch.randn(2, 3, 12), "attention_mask": torch.ones(2, 3)}, [-1])
    assert short.logits.shape == (2, 3)


def test_timesnet_padding_does_not_change_prediction():
    model = _timesnet().eval()
    batch = _batch(6)
    base = model(batch, [0, 1, 2, -1])
    padded = model(_extra_padding(batch, extra=10), [0, 1, 2, -1])
    assert torch.equal(base.logits, padded.logits)
    for layer, value in base.features.items():
        assert torch.equal(padded.features[layer][:, :20], value)
        assert padded.features[layer][:, 20:].abs().max() == 0
    # a series on its own: same prediction at its exact length and padded to any length
    one = {"x": batch["x"][1:2, :7], "attention_mask": batch["attention_mask"][1:2, :7]}
    alone = model(one).logits
    for extra in (1, 5, 22):
        assert torch.equal(model(_extra_padding({**one, "labels": None}, extra)).logits, alone)


def test_timesnet_taps_follow_layer_convention():
    model = _timesnet(e_layers=3).eval()
    batch = _batch()
    out = model(batch, [0, 1, 3, -1, -2])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        h = model.embedding(batch["x"], mask)
        assert torch.equal(out.features[0], h)
        for i, block in enumerate(model.blocks, start=1):
            h = block(h, mask)
            if i in (1, 3):
                assert torch.equal(out.features[i], h)
            if i == 2:
                assert torch.equal(out.features[-2], h)
        assert torch.equal(out.features[-1], model.norm(h, mask))


def test_timesnet_teacher_frozen_stops_early_and_releases():
    model = _timesnet(e_layers=3)
    teacher = tn.TimesNetTeacher(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ran = []
    model.blocks[2].register_forward_hook(lambda *_: ran.append(3))
    model.head.register_forward_hook(lambda *_: ran.append("head"))
    batch = _batch()
    features = teacher.features(batch, [2])
    assert features[2].shape == (4, 20, 32) and not features[2].requires_grad
    assert ran == []  # block 3 and the head were never computed
    final = teacher.features(batch, [-1])[-1]
    assert final.shape == (4, 20, 32) and teacher.calls == 2 and ran == [3]
    # fewer channels than the teacher was pretrained on: zero channels, as the joint loader does
    narrow = {**batch, "x": batch["x"][..., :6]}
    wide = {**batch, "x": F.pad(batch["x"][..., :6], (0, 6))}
    assert torch.equal(teacher.features(narrow, [-1])[-1], teacher.features(wide, [-1])[-1])
    teacher.release()
    assert teacher.model is None
    with pytest.raises(RuntimeError, match="released"):
        teacher.features(batch, [-1])


def test_timesnet_save_load_round_trip(tmp_path):
    model = tn.TimesNetClassifier(num_channels=12, num_classes=3, d_model=16, d_ff=16, top_k=2,
                                  num_kernels=3, seq_len=29, class_names=["a", "b", "c"],
                                  datasets=["JapaneseVowels"]).eval()
    tn.save_timesnet(model, tmp_path / "teacher")
    loaded = tn.load_timesnet(tmp_path / "teacher").eval()
    assert loaded.options == model.options and loaded.options["class_names"] == ["a", "b", "c"]
    batch = _batch()
    assert torch.equal(loaded(batch).logits, model(batch).logits)
    teacher = build_teacher(ModelConfig(kind="timesnet", name_or_path=str(tmp_path / "teacher")))
    assert isinstance(teacher, tn.TimesNetTeacher) and teacher.width(-1) == 16
    assert torch.equal(teacher.features(batch, [-1])[-1], model(batch, [-1]).features[-1])
    with pytest.raises(FileNotFoundError, match="save_timesnet"):
        tn.load_timesnet(tmp_path / "nothing")


def test_timesnet_student_from_registry():
    cfg = ModelConfig(kind="timesnet", options={"d_model": 16, "d_ff": 16, "e_layers": 1, "num_kernels": 2})
    student = build_student(cfg, data=DataInfo(num_classes=9, num_channels=12, seq_len=29))
    assert isinstance(student, tn.TimesNetClassifier)
    assert student.options["num_classes"] == 9 and student.num_layers == 1 and student.width(1) == 16
    with pytest.raises(ValueError, match="num_classes"):
        build_student(ModelConfig(kind="timesnet", options={"num_classes": 4}), data=DataInfo(num_classes=9, num_channels=12))
    with pytest.raises(ValueError, match=r"student.options.d_modle'; did you mean 'student.options.d_model'\? \(valid: d_model, d_ff"):
        build_student(ModelConfig(kind="timesnet", options={"d_modle": 8}), data=DataInfo(num_classes=9, num_channels=12))


def test_timesnet_trains_on_japanese_vowels_batches(jv):
    model = _timesnet(d_model=16, d_ff=16, num_kernels=2)
    model.head = torch.nn.Linear(16, jv.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = jv.train_batches(32)
    losses = []
    for _ in range(8):
        loss = model(next(batches)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3])


# --------------------------------------------------------------------------- HF decoder student

TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


def _hf_student(freeze: str = "none", pooling: str = "mean", **arch):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig(kind="hf_ts_classifier", source="config",
                      options={"arch": {**TINY_LLAMA, **arch}, "freeze": freeze, "pooling": pooling})
    return build_student(cfg, data=DataInfo(num_classes=3, num_channels=12, seq_len=20))


def test_hf_ts_features_align_with_timesnet_time_axis():
    student = _hf_student().eval()
    assert student.num_layers == 4 and student.align_layer == 1 and student.width(2) == 32
    batch = _batch()
    out = student(batch, [0, 1, 2, -1])
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
    for layer in (0, 1, 2, -1):
        assert out.features[layer].shape == (4, 20, 32)
    teacher = tn.TimesNetTeacher(_timesnet())
    target = teacher.features(batch, [-1])[-1]
    assert target.shape[:2] == out.features[student.align_layer].shape[:2]  # same [B, T]
    # layer 0 is the input embedding of each time step; -1 the backbone's final (normed) output
    mask = batch["attention_mask"][..., None].float()
    with torch.no_grad():
        assert torch.allclose(out.features[0], student.input_embedding(batch["x"] * mask))
    # the token-embedding matrix is not kept, and blocks are not duplicated in the state dict
    assert student.backbone.get_input_embeddings().weight.shape[0] == 1
    assert not any(k.startswith("_parts") for k in student.state_dict())
    assert _hf_student(num_hidden_layers=8).align_layer == 2


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_hf_ts_padding_does_not_change_prediction(pooling):
    student = _hf_student(pooling=pooling).eval()
    batch = _batch(6)
    with torch.no_grad():
        base = student(batch, [2])
        padded = student(_extra_padding(batch, extra=10), [2])
    assert torch.allclose(base.logits, padded.logits, atol=1e-5)
    real = batch["attention_mask"].bool()
    assert torch.allclose(base.features[2][real], padded.features[2][:, :20][real], atol=1e-5)
    with torch.no_grad():  # the head reads the pooled final layer: its mean, or the last real step
        final = student(batch, [-1]).features[-1]
        lengths = batch["attention_mask"].sum(1)
        m = batch["attention_mask"][..., None].float()
        pooled = final[torch.arange(len(final)), lengths - 1] if pooling == "last" else (final * m).sum(1) / m.sum(1)
        assert torch.allclose(student.head(pooled), base.logits, atol=1e-5)


@pytest.mark.parametrize("freeze", ["none", "backbone", "all_but_norms"])
def test_hf_ts_freezing(freeze):
    student = _hf_student(freeze).train()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    ours = {"input_embedding.weight", "input_embedding.bias", "head.weight", "head.bias"}
    assert ours <= trainable
    backbone = {n for n, _ in student.named_parameters() if n.startswith("backbone.")}
    norms = {n for n in backbone if "norm" in n}
    assert norms and len(norms) == 4 * 2 + 1  # two RMSNorms per block + the final norm
    if freeze == "none":
        assert backbone <= trainable
    elif freeze == "backbone":
        assert trainable == ours
    else:
        assert trainable == ours | norms
    student(_batch(), [1]).loss.backward()
    for name, p in student.named_parameters():
        if name in trainable and "embed_tokens" not in name:
            assert p.grad is not None, name
        if name not in trainable:
            assert p.grad is None, name
    with pytest.raises(ValueError, match="freeze"):
        _hf_student("everything")


def test_train_batch_augmentation_crops_jitters_and_resumes(jv):
    plain = next(jv.train_batches(32))
    batches = jv.train_batches(32, crop_min=0.5, jitter=0.1)
    augmented = next(batches)
    assert torch.equal(augmented["labels"], plain["labels"])  # same series, same order
    kept, full = augmented["attention_mask"].sum(1), plain["attention_mask"].sum(1)
    assert (kept <= full).all() and (kept >= (full * 0.5).ceil()).all() and (kept < full).any()
    # real steps come first and padding stays exactly zero
    mask = augmented["attention_mask"].bool()
    assert torch.equal(mask, torch.arange(mask.shape[1])[None] < kept[:, None])
    assert (augmented["x"][~mask] == 0).all() and not torch.equal(augmented["x"], plain["x"])
    # the augmentation is a function of the stream position: resume reproduces it
    state = batches.state_dict()
    expected = [next(batches) for _ in range(12)]
    resumed = jv.train_batches(32, crop_min=0.5, jitter=0.1)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)["x"], want["x"]) for want in expected)
    with pytest.raises(ValueError, match="crop_min"):
        jv.train_batches(32, crop_min=0.0)
