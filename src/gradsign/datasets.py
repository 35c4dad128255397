"""Image datasets of NAS-Bench-201 (CIFAR-10, CIFAR-100, ImageNet16-120) and canonical scoring batches.

Bundled images (``gradsign/data/``, see ``PROVENANCE.md``): the first 1,024 images of class-balanced,
shuffled subsets of the CIFAR-10 and CIFAR-100 *training* sets, and 120 ImageNet16-120-style images (one per
class, 16x16 box-downsampled from ImageNet sample photos, not the official ImageNet16 pixels). With
``data_dir`` the official training files are read instead:

* CIFAR-10: ``cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` (pickles; ``data`` (N, 3072) uint8 in
  CHW order, ``labels``);
* CIFAR-100: ``cifar-100-python/train`` (``data``, ``fine_labels``);
* ImageNet16-120: ``train_data_batch_1`` .. ``train_data_batch_10`` of Chrabaszcz et al.'s downsampled
  ImageNet 16x16 (``data`` (N, 768), ``labels`` 1-based); as in NAS-Bench-201, images with label <= 120 are
  kept and labelled ``label - 1``.

``data_dir`` may be the folder holding those files or its parent. Normalisation (NAS-Bench-201 constants,
per channel): ``x = (pixel / 255 - mean) / std``.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradsign.spaces.base import UnknownDatasetError

__all__ = ["DATASETS", "DatasetFilesNotFoundError", "DatasetInfo", "UnknownDatasetError", "canonical_batch",
           "dataset_info", "load_images", "normalize", "sample_batch"]

_DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a dataset: classes, input shape (C, H, W) and per-channel mean/std in [0, 1]."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bundled_file: str


def _scaled(values: tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(v / 255.0 for v in values)  # type: ignore[return-value]


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), _scaled((125.3, 123.0, 113.9)),
                           _scaled((63.0, 62.1, 66.7)), "cifar10_1024.npz"),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), _scaled((129.3, 124.1, 112.4)),
                            _scaled((68.2, 65.4, 70.4)), "cifar100_1024.npz"),
    "imagenet16-120": DatasetInfo("imagenet16-120", 120, (3, 16, 16), _scaled((122.68, 116.66, 104.01)),
                                  _scaled((63.22, 61.26, 65.09)), "imagenet16-120_120.npz"),
}

#: official training files per dataset (all must exist in one folder)
_OFFICIAL_FILES: dict[str, tuple[str, ...]] = {
    "cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "cifar100": ("train",),
    "imagenet16-120": tuple(f"train_data_batch_{i}" for i in range(1, 11)),
}
_LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels", "imagenet16-120": "labels"}


class DatasetFilesNotFoundError(FileNotFoundError):
    """Raised when ``data_dir`` does not hold a dataset's official files."""


def dataset_info(dataset: str) -> DatasetInfo:
    """The ``DatasetInfo`` of ``dataset`` ("cifar10", "cifar100" or "imagenet16-120")."""
    try:
        return DATASETS[dataset]
    except (KeyError, TypeError):
        raise UnknownDatasetError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler limited to plain containers and numpy arrays (what the official dataset files hold)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a dataset file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, object]:
    """A dataset pickle as a dict with str keys (py2 files are read with latin-1, as the CIFAR page advises)."""
    entry = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"{path} does not hold a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _find_folder(dataset: str, data_dir: Path) -> Path:
    """``data_dir`` or the first of its sub-folders that holds all official files of ``dataset``."""
    names = _OFFICIAL_FILES[dataset]
    candidates = [data_dir] + (sorted(p for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else [])
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    raise DatasetFilesNotFoundError(
        f"no {dataset} training files ({names[0]}..{names[-1]}) in {data_dir} or its sub-folders")


def _load_official(dataset: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = _find_folder(dataset, data_dir)
    side = dataset_info(dataset).input_shape[1]
    images, labels = [], []
    for name in _OFFICIAL_FILES[dataset]:
        entry = _read_pickle(folder / name)
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, side, side)
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry[_LABEL_KEY[dataset]], dtype=np.int64).reshape(-1))
    x, y = np.concatenate(images), np.concatenate(labels)
    if len(x) != len(y):
        raise ValueError(f"{dataset} files in {folder} have {len(x)} images but {len(y)} labels")
    if dataset == "imagenet16-120":
        keep = (y >= 1) & (y <= 120)
        x, y = x[keep], y[keep] - 1
    return np.ascontiguousarray(x), y


def load_images(dataset: str, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training images of ``dataset`` as (uint8 array (N, H, W, 3) RGB, int64 labels (N,)).

    ``data_dir=None`` gives the bundled subset (1,024 CIFAR images; 120 ImageNet16-120-style images);
    otherwise the official training files under ``data_dir`` are read (see the module docstring).
    """
    info = dataset_info(dataset)
    if data_dir is not None:
        return _load_official(dataset, Path(data_dir))
    with np.load(_DATA_DIR / info.bundled_file, allow_pickle=False) as f:
        return f["images"], f["labels"].astype(np.int64)


def normalize(images: np.ndarray, dataset: str) -> torch.Tensor:
    """uint8 NHWC images as a float32 tensor (N, 3, H, W): ``(pixel / 255 - mean) / std`` per channel."""
    info = dataset_info(dataset)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32).div(255.0)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def sample_batch(images: np.ndarray, labels: np.ndarray, dataset: str, batch_size: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` images drawn without replacement by ``numpy.random.default_rng(seed)``, normalised,
    no augmentation; returns (float32 (N, 3, H, W), int64 labels)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > len(images):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(images)} {dataset} images available")
    picked = np.random.default_rng(seed).choice(len(images), size=int(batch_size), replace=False)
    return normalize(images[picked], dataset), torch.from_numpy(np.asarray(labels)[picked].astype(np.int64))


def canonical_batch(dataset: str, batch_size: int, seed: int,
                    data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical scoring batch of (``dataset``, ``batch_size``, ``seed``): always the same images, drawn
    without replacement from ``load_images(dataset, data_dir)`` by ``numpy.random.default_rng(seed)``."""
    images, labels = load_images(dataset, data_dir)
    return sample_batch(images, labels, dataset, batch_size, seed)
