"""Datasets: bundled images, canonical batches, and readers for the official training files."""
from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from gradsign.datasets import (DATASETS, DatasetFilesNotFoundError, UnknownDatasetError, canonical_batch,
                               dataset_info, load_images, normalize, sample_batch)

SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "imagenet16-120": (16, 16, 3)}


def test_dataset_info_constants():
    c10 = dataset_info("cifar10")
    assert c10.num_classes == 10 and c10.input_shape == (3, 32, 32)
    assert c10.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    assert c10.std == pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255))
    c100 = dataset_info("cifar100")
    assert c100.num_classes == 100 and c100.mean == pytest.approx((129.3 / 255, 124.1 / 255, 112.4 / 255))
    assert c100.std == pytest.approx((68.2 / 255, 65.4 / 255, 70.4 / 255))
    in16 = dataset_info("imagenet16-120")
    assert in16.num_classes == 120 and in16.input_shape == (3, 16, 16)
    assert in16.mean == pytest.approx((122.68 / 255, 116.66 / 255, 104.01 / 255))
    assert in16.std == pytest.approx((63.22 / 255, 61.26 / 255, 65.09 / 255))


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_bundled_images(dataset):
    images, labels = load_images(dataset)
    n = 120 if dataset == "imagenet16-120" else 1024
    assert images.shape == (n, *SHAPES[dataset]) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    k = dataset_info(dataset).num_classes
    assert labels.min() >= 0 and labels.max() < k
    if dataset == "imagenet16-120":
        assert sorted(labels.tolist()) == list(range(120))
    else:
        assert len(np.unique(labels)) == k  # class-mixed
    assert 60 < images.mean() < 160 and images.std() > 30  # real pixels, not blank


@pytest.mark.parametrize("bad", ["mnist", "CIFAR10", "cifar10-valid", None])
def test_unknown_dataset(bad):
    for call in (lambda: load_images(bad), lambda: canonical_batch(bad, 4, 0), lambda: dataset_info(bad)):
        with pytest.raises(UnknownDatasetError) as info:
            call()
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_canonical_batch_is_deterministic_and_normalised():
    x, y = canonical_batch("cifar10", 64, seed=3)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x2, y2 = canonical_batch("cifar10", 64, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = canonical_batch("cifar10", 64, seed=4)
    assert not torch.equal(x, x3)
    # the same draw as numpy's default_rng(seed), normalised per channel
    images, labels = load_images("cifar10")
    picked = np.random.default_rng(3).choice(len(images), size=64, replace=False)
    info = dataset_info("cifar10")
    expected = (images[picked].astype(np.float64) / 255 - np.array(info.mean)) / np.array(info.std)
    assert np.allclose(x.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)
    assert np.array_equal(y.numpy(), labels[picked])
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


def test_batches_are_drawn_without_replacement():
    images, labels = load_images("imagenet16-120")
    x, y = canonical_batch("imagenet16-120", 120, seed=0)
    assert x.shape == (120, 3, 16, 16) and sorted(y.tolist()) == list(range(120))
    assert torch.allclose(x[torch.argsort(y)], normalize(images, "imagenet16-120"))


def test_batch_size_errors():
    with pytest.raises(ValueError, match="exceeds"):
        canonical_batch("imagenet16-120", 121, seed=0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            canonical_batch("cifar100", bad, seed=0)
    images, labels = load_images("cifar100")
    x, _ = sample_batch(images, labels, "cifar100", 8, seed=11)
    assert torch.equal(x, canonical_batch("cifar100", 8, seed=11)[0])


# --- official file formats -----------------------------------------------------------------------------
def _chw_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _write_cifar10(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for b, part in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
        entry = {b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels[part].tolist(),
                 b"data": _chw_rows(images[part]), b"filenames": [b"x.png"] * len(part)}
        # protocol 2 with the pre-numpy-2 module path, as in the official (Python 2) files
        raw = pickle.dumps(entry, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        (folder / f"data_batch_{b}").write_bytes(raw)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _chw_rows(images[:2]), b"labels": [0, 1]}))


def test_official_cifar10_files(tmp_path):
    images, labels = load_images("cifar10")
    _write_cifar10(tmp_path / "cifar-10-batches-py", images[:100], labels[:100])
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py", str(tmp_path)):
        x, y = load_images("cifar10", data_dir)
        assert np.array_equal(x, images[:100]) and np.array_equal(y, labels[:100]) and y.dtype == np.int64
    bx, by = canonical_batch("cifar10", 16, seed=1, data_dir=tmp_path)
    assert bx.shape == (16, 3, 32, 32)
    with pytest.raises(ValueError, match="exceeds"):
        canonical_batch("cifar10", 101, seed=1, data_dir=tmp_path)


def test_official_cifar100_file(tmp_path):
    images, labels = load_images("cifar100")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    entry = {b"filenames": [b"a.png"] * 50, b"batch_label": b"training batch 1 of 1",
             b"fine_labels": labels[:50].tolist(), b"coarse_labels": (labels[:50] // 5).tolist(),
             b"data": _chw_rows(images[:50])}
    (folder / "train").write_bytes(pickle.dumps(entry, protocol=2))
    x, y = load_images("cifar100", tmp_path)
    assert np.array_equal(x, images[:50]) and np.array_equal(y, labels[:50])


def test_official_imagenet16_files(tmp_path):
    images, labels = load_images("imagenet16-120")
    folder = tmp_path / "Imagenet16_train"
    folder.mkdir()
    # 1-based labels; rows labelled > 120 belong to the other ImageNet classes and are dropped
    all_images = np.concatenate([images, images[:30]])
    all_labels = np.concatenate([labels + 1, np.arange(121, 151)])
    for b, part in enumerate(np.array_split(np.arange(len(all_images)), 10), start=1):
        entry = {"data": _chw_rows(all_images[part]), "labels": all_labels[part].tolist(),
                 "mean": np.zeros(768)}
        (folder / f"train_data_batch_{b}").write_bytes(pickle.dumps(entry))
    x, y = load_images("imagenet16-120", tmp_path)
    assert np.array_equal(x, images) and np.array_equal(y, labels)


def test_missing_or_unsafe_files(tmp_path):
    with pytest.raises(DatasetFilesNotFoundError) as info:
        load_images("cifar10", tmp_path)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_images("imagenet16-120", tmp_path / "absent")
    (tmp_path / "train").write_bytes(pickle.dumps({"data": OrderedDict(), "fine_labels": []}))
    with pytest.raises(pickle.UnpicklingError):
        load_images("cifar100", tmp_path)


def test_bundled_images_equal_shared_sources(shared_dir):
    src = shared_dir / "data" / "images"
    for dataset, name, n in (("cifar10", "cifar10_train_5000.npz", 1024),
                             ("cifar100", "cifar100_train_5000.npz", 1024),
                             ("imagenet16-120", "imagenet16_120_box16_from_sample_images_120.npz", 120)):
        with np.load(src / name, allow_pickle=False) as f:
            images, labels = load_images(dataset)
            assert np.array_equal(images, f["images"][:n]) and np.array_equal(labels, f["labels"][:n])
