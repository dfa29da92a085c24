"""Images as a third modality: the timm_vision adapter (features of a ViT and a CNN, layer
indexing, class tokens, grids matched by interpolation, checkpoints), the image_classify task
(stratified seeded splits, an exactly resumable augmented stream, ImageFolder) and the digits
recipes end to end and under ``alignkit check``. Offline and CPU-only, tiny timm models."""
from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(find_spec("timm") is None or find_spec("torchvision") is None,
                                reason="needs the [vision] extra (timm, torchvision)")

import alignkit.adapters  # noqa: E402,F401  (registers the adapters)
from alignkit.cli import main  # noqa: E402
from alignkit.core.adapter import DataInfo  # noqa: E402
from alignkit.core.config import ModelConfig  # noqa: E402
from alignkit.core.errors import ConfigError, MissingFile  # noqa: E402
from alignkit.core.registry import build_student, build_teacher  # noqa: E402
from alignkit.tasks.image_data import ImageDataConfig, load_images, stratified_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "vision" / "digits.yaml")
DATA = DataInfo(num_classes=3, num_channels=1)
VIT = {"model_name": "vit_tiny_patch16_224", "img_size": 16,
       "model_kwargs": {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2}}  # 8 x 8 patches
CNN = {"model_name": "resnet10t", "img_size": 16, "model_kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny convolutions on a shared machine: threads only contend


def model(options: dict, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(ModelConfig(kind="timm_vision", options={**options, **extra}), data=DATA).eval()


def images(n: int = 2) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)),
            "labels": torch.arange(n) % 3}


def test_vit_tokens_by_layer_with_the_class_token_dropped_or_kept():
    vit = model(VIT)
    assert vit.num_layers == 2 and vit.align_layer == 1 and vit.width(-1) == 16
    with torch.no_grad():
        out = vit(images(), [0, 1, 2, -1, -2])
        final = vit.model.forward_features(images()["pixel_values"])
    assert {k: tuple(v.shape) for k, v in out.features.items()} == {k: (2, 64, 16) for k in (0, 1, 2, -1, -2)}
    assert torch.equal(out.features[-1], final[:, 1:])  # layer -1: forward_features, class token dropped
    assert torch.equal(out.features[-2], out.features[1]) and not torch.equal(out.features[2], out.features[-1])
    kept = model(VIT, prefix_tokens="keep")
    with torch.no_grad():
        tokens = kept(images(), [-1]).features[-1]
    assert tokens.shape == (2, 65, 16) and torch.equal(tokens, final)
    with pytest.raises(ConfigError, match="out of range"):
        vit(images(), [3])


def test_cnn_stage_maps_flattened_over_positions():
    cnn = model(CNN)
    assert cnn.num_layers == len(cnn.model.feature_info) == 5  # stem activation and four stages
    with torch.no_grad():
        out = cnn(images(), [*range(6), -1])
        final = cnn.model.forward_features(images()["pixel_values"])  # [B, C, H, W]
    assert torch.equal(out.features[-1], final.flatten(2).transpose(1, 2))
    assert [out.features[k].shape[-1] for k in range(6)] == [cnn.width(k) for k in range(6)]
    assert [cnn.positions(k) for k in range(6)] == [64, 64, 16, 4, 1, 1]  # the maps shrink stage by stage
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0


def test_grids_of_different_sizes_meet_by_bilinear_interpolation():
    vit, cnn = model(VIT, feature_grid=4), model(CNN, feature_grid=4)
    native = model(VIT)
    with torch.no_grad():
        resampled = vit(images(), [1]).features[1]
        tokens = native(images(), [1]).features[1]  # same weights (same seed), 8 x 8 grid
        maps = cnn(images(), [2, 3]).features
    grid = tokens.transpose(1, 2).reshape(2, 16, 8, 8)
    expected = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(resampled, expected.flatten(2).transpose(1, 2))
    assert maps[2].shape[1] == maps[3].shape[1] == 16  # a 4 x 4 map stays, a 2 x 2 map is upsampled
    assert vit.positions(1) == cnn.positions(-1) == 16


def test_teacher_loads_a_saved_student_and_check_reads_no_weights(tmp_path):
    student = model(CNN)
    student.save_pretrained(tmp_path / "final")
    saved = json.loads((tmp_path / "final" / "timm_vision.json").read_text())
    assert saved["model_name"] == "resnet10t" and saved["num_classes"] == 3 and saved["in_chans"] == 1
    torch.manual_seed(5)  # a different initialisation: only loading can make the logits agree
    teacher = build_teacher(ModelConfig(kind="timm_vision", source="checkpoint", name_or_path=str(tmp_path / "final"),
                                        options=CNN), data=DATA)
    features, logits = teacher.run(images(), [-1], logits=True)
    with torch.no_grad():
        assert torch.allclose(logits, student(images()).logits)
    assert teacher.width(-1) == 16 and features[-1].shape == (2, 1, 16)
    missing = ModelConfig(kind="timm_vision", source="checkpoint", name_or_path=str(tmp_path / "none"), options=CNN)
    assert build_teacher(missing, device="meta", data=DATA).width(-1) == 16  # shapes on meta, no file read
    with pytest.raises(MissingFile, match="teacher.name_or_path"):
        build_teacher(missing, data=DATA)


def test_splits_are_stratified_disjoint_and_seeded():
    labels = torch.as_tensor(np.repeat(np.arange(4), [10, 20, 30, 40]))
    kept, carved = stratified_split(labels, 0.2, seed=0, what="val_fraction")
    assert sorted(kept.tolist() + carved.tolist()) == list(range(100))
    assert torch.bincount(labels[carved]).tolist() == [2, 4, 6, 8]
    assert torch.equal(carved, stratified_split(labels, 0.2, seed=0, what="val_fraction")[1])
    assert not torch.equal(carved, stratified_split(labels, 0.2, seed=1, what="val_fraction")[1])
    first, second = load_images(ImageDataConfig(image_size=8)), load_images(ImageDataConfig(image_size=8, seed=1))
    assert len(first.train) + len(first.val) + len(first.test) == 1797 and first.num_classes == 10
    assert torch.equal(first.test.images, second.test.images)  # the test split does not move with the seed
    assert not torch.equal(first.val.images, second.val.images)
    rows = {tuple(image.flatten().tolist()) for image in first.test.images}
    assert not rows & {tuple(image.flatten().tolist()) for image in first.val.images}


def test_training_stream_augments_and_resumes_exactly():
    splits = load_images(ImageDataConfig(image_size=8))
    stream = splits.train_batches(16)
    for _ in range(3):
        next(stream)
    state, expected = stream.state_dict(), next(stream)
    resumed = splits.train_batches(16)
    resumed.load_state_dict(state)
    batch = next(resumed)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"]) and torch.equal(batch["labels"], expected["labels"])
    plain = splits.normalize(splits.train.images[:16])
    assert not torch.allclose(next(splits.train_batches(16))["pixel_values"], plain)  # shuffled and augmented


def test_image_folder_source(tmp_path):
    from PIL import Image

    for index in range(12):
        folder = tmp_path / "train" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 12, 3), index * 20, dtype=np.uint8)).save(folder / f"{index}.png")
    splits = load_images(ImageDataConfig(source="folder", path=str(tmp_path), image_size=8, val_fraction=0.34,
                                         test_fraction=0.34))
    assert splits.class_names == ["cat", "dog"] and splits.num_channels == 3
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    assert all(part.labels.unique().tolist() == [0, 1] for part in (splits.train, splits.val, splits.test))
    assert splits.train.images.shape[1:] == (3, 8, 8)
    with pytest.raises(MissingFile, match="task.data.path"):
        load_images(ImageDataConfig(source="folder", path=str(tmp_path / "nowhere")))


TINY = ["student.options.model_kwargs.embed_dim=16", "student.options.model_kwargs.depth=2",
        "student.options.model_kwargs.num_heads=2", "train.steps=4", "train.micro_batch_size=16",
        "train.eval_every=2", "--no-progress"]


def test_digits_teacher_pretrained_by_the_stage_then_let_end_to_end(tmp_path):
    teacher_budget = ["task.teacher_pretrain.steps=4", "task.teacher_pretrain.micro_batch_size=16",
                      "task.teacher_pretrain.eval_every=2"]
    assert main(["train", RECIPE, f"output_dir={tmp_path}", "run_name=let", "align.stop_step=2", *teacher_budget,
                 *TINY]) == 0
    cached = list((tmp_path / "teachers").glob("timm_vision-digits-*"))
    assert len(cached) == 1 and (cached[0] / "final" / "model.safetensors").is_file()
    assert "test_accuracy" in json.loads((cached[0] / "results.json").read_text())
    run = tmp_path / "let"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("align_loss" in r for r in records) and any("val_accuracy" in r for r in records)
    results = json.loads((run / "test_results.json").read_text())
    confusion = np.array(results["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == results["test_size"] == 360
    assert results["test_accuracy"] == pytest.approx(np.trace(confusion) / 360)
    assert (run / "confusion_matrix.png").is_file() and (run / "final" / "timm_vision.json").is_file()


def test_check_digits_recipe_offline_before_the_teacher_is_trained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no teacher cache here: check builds the untrained teacher on meta
    assert main(["check", RECIPE, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["student_layers"] == 6 and report["student_width"] == 96
    assert report["teachers"]["default"] == {"layers": 5, "width": 64}
    assert report["data"]["num_classes"] == 10 and report["data"]["num_channels"] == 1
    assert report["memory"] == "not estimated for timm_vision students"
