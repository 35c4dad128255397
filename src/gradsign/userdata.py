"""The user's own data for ``gradsign rank``: an image folder, an ``.npz`` with ``x``/``y``, or a CSV table,
and one canonical scoring batch drawn from it.

Formats (chosen by the path):

* a folder in the ImageFolder layout, ``PATH/CLASS/IMAGE``: one sub-folder per class, classes numbered in
  sorted order of their folder names (the convention of torchvision's ``ImageFolder``); files with an image
  extension (``IMAGE_EXTENSIONS``) count, hidden files and other files are ignored. Images are read with
  Pillow, as RGB, or as one grey channel when every image of the batch is greyscale; pixels are divided
  by 255. Only the images drawn into the batch are decoded. They must share one size unless
  ``image_size`` is given (then each is resized, bilinear).
* ``.npz`` (read without pickles) with arrays ``x`` (N, ...) in the layout the models take (e.g. N, C, H,
  W) and ``y`` (N,) labels or (N, K) targets; uint8 ``x`` is taken as pixels and divided by 255; ``x`` of
  a signed integer dtype as token ids (or other indices, for an embedding), given to the models as int64
  and never normalised (save integer features as floats).
* ``.csv`` with a header row: ``target`` names the target column, every other column is a numeric
  feature (x is (N, F)).

Targets follow the loss (``TARGET_KINDS``): ``classes`` (cross-entropy) takes integer labels as class
indices (0..max) and maps any other labels (strings) to indices in sorted order; ``binary`` (BCE on
logits) takes 0/1 labels, (N,) or multi-label (N, K), or exactly two classes; ``values`` (MSE) takes
numbers. 1-D value targets become (N, 1), the shape of a one-output model.

The batch (``draw_batch``): ``batch_size`` samples drawn without replacement by
``numpy.random.default_rng(seed)``. With class labels the classes are balanced: every class gets
``batch_size // C`` samples (a class with fewer gives all it has and the rest is shared among the others),
and the remaining slots go to distinct classes drawn at random; the batch is then shuffled. Without class
labels (values) the samples are drawn uniformly. No augmentation.

Normalisation (``normalize``), per channel, i.e. per index of axis 1 (the channel of N, C, H, W images, the
feature of an N, F table): ``"batch"`` (default) subtracts the batch mean and divides by the batch standard
deviation (population, over every other axis; a constant channel is only centred); ``"none"`` leaves the
values (pixels scaled to [0, 1]); ``"M1,M2,.../S1,S2,..."`` gives the means and standard deviations (one
value, or one per channel); a dataset name of ``gradsign.datasets.DATASETS`` (e.g. ``"cifar10"``) uses its
constants.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "TARGET_KINDS", "Batch", "UserData", "UserDataError", "balanced_indices",
           "draw_batch", "load_data", "normalize_batch"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".gif", ".tif", ".tiff",
                    ".webp")
TARGET_KINDS = ("classes", "binary", "values")
_GREY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


class UserDataError(ValueError):
    """Data that cannot be read or does not fit the request (one-line message)."""


@dataclass(frozen=True)
class UserData:
    """A data set as loaded by ``load_data``: either arrays (``x``) or image files (``files``) with labels.

    ``labels`` is (N,) or (N, K); ``classes`` names the classes of an image folder (label i is
    ``classes[i]``) and is None otherwise.
    """

    source: str
    kind: str  # "image folder", "npz" or "csv"
    labels: np.ndarray
    x: np.ndarray | None = field(default=None, repr=False)
    files: tuple[Path, ...] | None = field(default=None, repr=False)
    classes: tuple[str, ...] | None = None
    image_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, indices: np.ndarray) -> np.ndarray:
        """The inputs of the samples ``indices`` as float32, pixels scaled to [0, 1], not normalised; token
        ids (signed integers) as int64."""
        if self.files is not None:
            return _read_images([self.files[i] for i in indices], self.image_size)
        x = self.x[indices]
        if x.dtype == np.uint8:
            return x.astype(np.float32) / np.float32(255.0)
        if np.issubdtype(x.dtype, np.signedinteger):
            return x.astype(np.int64)
        return x.astype(np.float32)


@dataclass(frozen=True)
class Batch:
    """The canonical scoring batch: float32 inputs (normalised) or int64 token ids, and targets for the loss,
    with what was done."""

    inputs: torch.Tensor
    targets: torch.Tensor
    target_kind: str
    num_outputs: int
    class_names: tuple[str, ...] | None
    indices: np.ndarray
    description: str


# ---------------------------------------------------------------- loading
def load_data(path: str | Path, *, target: str | None = None,
              image_size: tuple[int, int] | None = None) -> UserData:
    """Load an image folder, ``.npz`` (``x``, ``y``) or ``.csv`` (``target`` column) as described in the
    module docstring. Raises ``UserDataError`` with a one-line message on any problem."""
    p = Path(path)
    if not p.exists():
        raise UserDataError(f"no data at {p}")
    if p.is_dir():
        if target is not None:
            raise UserDataError("--target applies to CSV files only")
        return _load_image_folder(p, image_size)
    if image_size is not None:
        raise UserDataError("--image-size applies to image folders only")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        if target is not None:
            raise UserDataError("--target applies to CSV files only (an .npz holds x and y)")
        return _load_npz(p)
    if suffix == ".csv":
        return _load_csv(p, target)
    raise UserDataError(f"unknown data format {p.name}: give an image folder, an .npz or a .csv")


def _load_image_folder(root: Path, image_size: tuple[int, int] | None) -> UserData:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserDataError(f"{root} has no class sub-folders (ImageFolder layout: {root}/CLASS/IMAGE)")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(f for f in (root / name).rglob("*") if f.is_file()
                       and f.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in f.relative_to(root).parts))
        if not found:
            raise UserDataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [index] * len(found)
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise UserDataError(f"image size must be two positive integers, got {image_size}")
    return UserData(str(root), "image folder", np.asarray(labels, np.int64), files=tuple(files),
                    classes=tuple(classes), image_size=tuple(image_size) if image_size else None)


def _read_images(paths: list[Path], size: tuple[int, int] | None) -> np.ndarray:
    """Decode images as float32 (N, C, H, W) in [0, 1]; C = 1 when all are greyscale, else 3 (RGB)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
        except UnidentifiedImageError:
            raise UserDataError(f"cannot read image {path}: not an image Pillow can read") from None
        except (OSError, ValueError) as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserDataError(f"cannot read image {path}: {detail}") from None
    for path, image in zip(paths, images):
        if image.mode not in _GREY_MODES + _COLOUR_MODES:
            raise UserDataError(f"image {path} has mode {image.mode} (16-bit or float pixels); "
                                "only 8-bit greyscale and colour images are read")
    mode = "L" if all(image.mode in _GREY_MODES for image in images) else "RGB"
    arrays = []
    for path, image in zip(paths, images):
        image = image.convert(mode)
        if size is not None:
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)  # Pillow takes (W, H)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[None] if mode == "L" else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        other = next(i for i, a in enumerate(arrays) if a.shape != first)
        raise UserDataError(f"images differ in size ({first[1]}x{first[2]} {paths[0]}, "
                            f"{arrays[other].shape[1]}x{arrays[other].shape[2]} {paths[other]}); "
                            "pass --image-size H,W")
    return np.stack(arrays).astype(np.float32) / np.float32(255.0)


def _load_npz(path: Path) -> UserData:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "x" not in keys or "y" not in keys:
                raise UserDataError(f"{path} must hold arrays 'x' and 'y'; it holds {', '.join(keys) or 'none'}")
            x, y = f["x"], f["y"]
    except UserDataError:
        raise
    except (OSError, ValueError, EOFError) as error:  # not a zip, truncated, or object arrays
        raise UserDataError(f"cannot read {path} as .npz: {str(error).splitlines()[0]}") from None
    if x.ndim < 2:
        raise UserDataError(f"x in {path} has shape {x.shape}; expected (N, ...) with a sample axis and "
                            "at least one feature axis")
    if len(x) != len(y):
        raise UserDataError(f"x and y in {path} differ in length ({len(x)} and {len(y)})")
    if y.ndim not in (1, 2):
        raise UserDataError(f"y in {path} has shape {y.shape}; expected (N,) labels or (N, K) targets")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise UserDataError(f"x in {path} has dtype {x.dtype}; expected numbers")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise UserDataError(f"x in {path} holds NaN or infinite values")
    return UserData(str(path), "npz", y, x=x)


def _load_csv(path: Path, target: str | None) -> UserData:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM is not part of the first name
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserDataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise UserDataError(f"{path} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if target is None:
        raise UserDataError(f"a CSV needs --target COLUMN; columns of {path.name}: {', '.join(header)}")
    if target not in header:
        raise UserDataError(f"no column {target!r} in {path.name}; columns: {', '.join(header)}")
    if len(header) < 2:
        raise UserDataError(f"{path.name} has no feature column besides the target {target!r}")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserDataError(f"{path.name} line {line} has {len(row)} fields, the header {len(header)}")
    t = header.index(target)
    features = [c for c in range(len(header)) if c != t]
    x = np.empty((len(rows) - 1, len(features)), np.float64)
    for j, c in enumerate(features):
        for i, row in enumerate(rows[1:]):
            try:
                x[i, j] = float(row[c])
            except ValueError:
                raise UserDataError(f"{path.name} line {i + 2}: feature {header[c]!r} is {row[c]!r}, not a "
                                    "number") from None
    if not np.isfinite(x).all():
        raise UserDataError(f"{path.name} has NaN or infinite feature values")
    labels = np.asarray([row[t].strip() for row in rows[1:]], dtype=object)
    return UserData(str(path), "csv", labels, x=x)


# ---------------------------------------------------------------- targets
def _class_codes(data: UserData) -> tuple[np.ndarray, tuple[str, ...]]:
    """(N,) int64 class indices and class names: integer labels are indices 0..max, others are mapped in
    sorted order."""
    labels = data.labels
    if labels.ndim != 1:
        raise UserDataError(f"class labels must be (N,), got shape {labels.shape} in {data.source}")
    if data.classes is not None:
        return labels.astype(np.int64), data.classes
    ints = _as_integers(labels)
    if ints is not None:
        if ints.min() < 0:
            raise UserDataError(f"class label {int(ints.min())} in {data.source} is negative")
        return ints, tuple(str(i) for i in range(int(ints.max()) + 1))
    if labels.dtype.kind == "f":
        raise UserDataError(f"labels in {data.source} are not whole numbers; a classification loss needs "
                            "class labels (use --loss mse for values)")
    text = labels.astype(str)
    names = tuple(sorted(set(text.tolist())))
    lookup = {name: i for i, name in enumerate(names)}
    return np.asarray([lookup[v] for v in text.tolist()], np.int64), names


def _as_integers(labels: np.ndarray) -> np.ndarray | None:
    if labels.dtype == bool or labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        if np.isfinite(labels).all() and (labels == np.round(labels)).all():
            return labels.astype(np.int64)
        return None
    try:
        values = [int(v) for v in labels.astype(str).tolist()]
    except ValueError:
        return None
    return np.asarray(values, np.int64)


def _values(data: UserData) -> np.ndarray:
    labels = data.labels
    if data.classes is not None:
        raise UserDataError("an image folder has class labels; a value loss (mse) needs numeric targets")
    try:
        values = labels.astype(np.float64)
    except ValueError:
        raise UserDataError(f"targets in {data.source} are not numbers; a value loss (mse) needs numbers"
                            ) from None
    if not np.isfinite(values).all():
        raise UserDataError(f"targets in {data.source} hold NaN or infinite values")
    return values


def _targets(data: UserData, kind: str) -> tuple[np.ndarray, int, np.ndarray | None, tuple[str, ...] | None]:
    """(targets for all samples, model outputs, class codes to balance on or None, class names)."""
    if kind == "classes":
        codes, names = _class_codes(data)
        if len(names) < 2:
            raise UserDataError(f"{data.source} has only one class; a classification loss needs at least two")
        return codes, len(names), codes, names
    if kind == "binary":
        if data.labels.ndim == 2:
            values = _values(data)
            if not np.isin(values, (0.0, 1.0)).all():
                raise UserDataError(f"multi-label targets in {data.source} must be 0 or 1")
            return values.astype(np.float32), values.shape[1], None, None
        codes, names = _class_codes(data)
        if len(names) != 2:
            raise UserDataError(f"bce needs two classes (0/1) or (N, K) 0/1 targets; {data.source} has "
                                f"{len(names)} classes")
        return codes.astype(np.float32)[:, None], 1, codes, names
    if kind == "values":
        values = _values(data).astype(np.float32)
        values = values[:, None] if values.ndim == 1 else values
        return values, values.shape[1], None, None
    raise ValueError(f"unknown target kind {kind!r}; choose one of {', '.join(TARGET_KINDS)}")


# ---------------------------------------------------------------- the batch
def balanced_indices(codes: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``batch_size`` distinct indices with classes as equal in number as the data allow (see the module
    docstring), in random order."""
    classes = np.unique(codes)
    members = [rng.permutation(np.flatnonzero(codes == c)) for c in classes]
    available = np.array([len(m) for m in members])
    quota = np.zeros(len(classes), np.int64)
    remaining = batch_size
    while remaining > 0:
        open_ = np.flatnonzero(quota < available)
        share = remaining // len(open_)
        if share == 0:
            for c in rng.choice(open_, size=remaining, replace=False):
                quota[c] += 1
            break
        for c in open_:
            add = min(share, available[c] - quota[c])
            quota[c] += add
            remaining -= add
    picked = np.concatenate([m[:q] for m, q in zip(members, quota)])
    return rng.permutation(picked)


def normalize_batch(x: np.ndarray, normalize: str = "batch") -> tuple[np.ndarray, str]:
    """Normalise per index of axis 1 (see the module docstring); returns the array and a description. Token
    ids (integers) are left as they are: "batch" (the default) and "none" leave them, given statistics are
    refused."""
    if np.issubdtype(x.dtype, np.integer):
        if normalize not in ("batch", "none"):
            raise UserDataError(f"normalisation {normalize!r} applies to floating inputs; these are integer "
                                "token ids, which are never normalised")
        return x, "token ids (int64), not normalised"
    if normalize == "none":
        return x, "not normalised"
    axes = tuple(a for a in range(x.ndim) if a != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    if normalize == "batch":
        mean = x.astype(np.float64).mean(axis=axes)
        std = x.astype(np.float64).std(axis=axes)
        std[std == 0] = 1.0
        text = "per-channel mean/std of the batch"
    else:
        mean, std, text = _given_statistics(normalize, x.shape[1])
    out = (x - mean.reshape(shape)) / std.reshape(shape)
    return out.astype(np.float32), text


def _given_statistics(text: str, channels: int) -> tuple[np.ndarray, np.ndarray, str]:
    from gradsign.datasets import DATASETS

    if text in DATASETS:
        info = DATASETS[text]
        mean, std = np.asarray(info.mean, np.float64), np.asarray(info.std, np.float64)
        label = f"{text} mean/std"
    else:
        try:
            mean_text, std_text = text.split("/")
            mean = np.asarray([float(v) for v in mean_text.split(",")])
            std = np.asarray([float(v) for v in std_text.split(",")])
        except ValueError:
            raise UserDataError(f"unknown normalisation {text!r}; give batch, none, a dataset name "
                                f"({', '.join(DATASETS)}) or MEANS/STDS such as 0.5,0.5,0.5/0.25,0.25,0.25"
                                ) from None
        label = f"mean {mean_text} / std {std_text}"
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise UserDataError(f"normalisation {text!r} needs finite means and positive standard deviations")
    for values in (mean, std):
        if len(values) not in (1, channels):
            raise UserDataError(f"normalisation {text!r} has {len(values)} values for {channels} channels")
    return np.broadcast_to(mean, (channels,)), np.broadcast_to(std, (channels,)), label


def draw_batch(data: UserData, batch_size: int, seed: int, *, target_kind: str = "classes",
               normalize: str = "batch") -> Batch:
    """The canonical batch of (data, batch_size, seed, target kind, normalisation): see the module docstring."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserDataError(f"batch size must be a positive integer, got {batch_size!r}")
    if batch_size > len(data):
        raise UserDataError(f"batch size {batch_size} exceeds the {len(data)} samples of {data.source}")
    targets, outputs, codes, names = _targets(data, target_kind)
    rng = np.random.default_rng(seed)
    if codes is not None:
        indices = balanced_indices(codes, int(batch_size), rng)
        per_class = np.bincount(codes[indices], minlength=len(names))
        drawn = f"classes balanced ({per_class.min()}-{per_class.max()} per class)"
    else:
        indices = rng.choice(len(data), size=int(batch_size), replace=False)
        drawn = "drawn uniformly"
    x, normalised = normalize_batch(data.inputs(indices), normalize)
    y = torch.from_numpy(np.ascontiguousarray(targets[indices]))
    classes = f", {len(names)} classes" if names is not None else ""
    description = (f"{data.source} ({data.kind}, {len(data)} samples{classes}); batch {batch_size} of shape "
                   f"{tuple(x.shape[1:])}, seed {seed}, {drawn}; inputs {normalised}")
    return Batch(torch.from_numpy(np.ascontiguousarray(x)), y, target_kind, outputs, names, indices,
                 description)

