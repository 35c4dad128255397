"""The five cell-based NDS design spaces (Radosavovic et al., "On Network Design Spaces for Visual
Recognition", ICCV 2019): DARTS, ENAS, PNAS, NASNet and Amoeba, on CIFAR-10.

Each space is a small definition (op set, nodes per cell, cell output rule) over one network builder,
``darts_model.DartsNetwork``. A model is a genotype plus the network's width (initial channels), depth (cells)
and whether it has the auxiliary head; its arch string is::

    Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[...], reduce=[...], reduce_concat=[...]) width=16 depth=8 aux=0

A bare genotype means the DARTS CIFAR-10 evaluation network: width 36, depth 20, no auxiliary head.
Sampling follows each space's rules (``docs/nds.md``): per node two ops drawn uniformly from the space's op
set and two inputs drawn uniformly from the earlier states; the output concatenates all nodes (DARTS, PNAS)
or the nodes no other node uses (ENAS, NASNet, Amoeba); width from (16, 24, 32), depth from (4, 8, 12, 16,
20), no auxiliary head.

These spaces are sampled, not enumerable, and tabulated only by the NDS result files (``DARTS.json``, ...,
public at https://dl.fbaipublicfiles.com/nds/data.zip), which the package does not ship. Given the folder
that holds them (``nds_dir``, or the environment variable ``GRADSIGN_NDS_DIR``), the models of a space's file
get indices in file order (a file split into ``top`` and ``mid`` is read as top then mid) and ``query`` gives
their final test accuracy: 100 - ``test_ep_top1[-1]`` (CIFAR-10 test set, single training run). Entries whose
networks are identical (same genotype, width, depth and auxiliary head) are one model whose accuracy is
the mean over those entries; ``duplicates`` counts them. Without the files every index or table look-up
raises ``NDSFilesMissingError`` saying which file to get and where to put it.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradsign.spaces.base import SearchSpace, UnknownArchError, UnknownDatasetError
from gradsign.spaces.darts_model import (DartsNetwork, Genotype, build_darts, check_genotype, format_genotype,
                                         genotype_from_lists, param_count, parse_genotype)

__all__ = ["DEPTHS", "ENV_VAR", "NDS_DATA_URL", "SPACES", "WIDTHS", "NDSFileError", "NDSFilesMissingError",
           "NDSModel", "NDSResult", "NDSSpace", "NDSSpec", "load_results", "loose_ends"]

#: environment variable naming the folder with the NDS result files
ENV_VAR = "GRADSIGN_NDS_DIR"
#: where the NDS result files are published (the NDS repository's README)
NDS_DATA_URL = "https://dl.fbaipublicfiles.com/nds/data.zip"
#: width (initial channels) and depth (cells) options of the sampled NDS models
WIDTHS: tuple[int, ...] = (16, 24, 32)
DEPTHS: tuple[int, ...] = (4, 8, 12, 16, 20)
#: the DARTS CIFAR-10 evaluation network: what a bare genotype means
DEFAULT_WIDTH, DEFAULT_DEPTH = 36, 20


class NDSFilesMissingError(LookupError):
    """A look-up that needs an NDS result file, without the file."""


class NDSFileError(ValueError):
    """An NDS result file that cannot be read or is not in the official format."""


@dataclass(frozen=True)
class NDSSpec:
    """One design space: its name here, its result file's stem, op set, nodes per cell and output rule."""

    name: str
    file_stem: str
    ops: tuple[str, ...]
    nodes: int
    loose_end: bool  # True: concatenate the nodes no other node uses; False: all nodes


SPACES: dict[str, NDSSpec] = {s.name: s for s in (
    NDSSpec("nds-darts", "DARTS", ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                                   "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"), 4, False),
    NDSSpec("nds-enas", "ENAS", ("skip_connect", "sep_conv_3x3", "sep_conv_5x5", "avg_pool_3x3",
                                 "max_pool_3x3"), 5, True),
    NDSSpec("nds-pnas", "PNAS", ("sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7", "conv_7x1_1x7", "skip_connect",
                                 "avg_pool_3x3", "max_pool_3x3", "dil_conv_3x3"), 5, False),
    NDSSpec("nds-nasnet", "NASNet", ("skip_connect", "conv_3x1_1x3", "conv_7x1_1x7", "dil_conv_3x3",
                                     "avg_pool_3x3", "max_pool_3x3", "max_pool_5x5", "max_pool_7x7", "conv_1x1",
                                     "conv_3x3", "sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7"), 5, True),
    NDSSpec("nds-amoeba", "Amoeba", ("skip_connect", "sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7",
                                     "avg_pool_3x3", "max_pool_3x3", "dil_sep_conv_3x3", "conv_7x1_1x7"), 5, True),
)}


@dataclass(frozen=True)
class NDSModel:
    """A genotype with the network's width, depth and auxiliary head: one model of a design space."""

    genotype: Genotype
    width: int
    depth: int
    aux: bool

    def text(self) -> str:
        """The arch string (see the module docstring)."""
        return f"{format_genotype(self.genotype)} width={self.width} depth={self.depth} aux={int(self.aux)}"


@dataclass(frozen=True)
class NDSResult:
    """One entry of an NDS result file (accuracies in %, from the file's top-1 errors)."""

    model: NDSModel
    test_acc: float        # 100 - test_ep_top1[-1]: after the last epoch
    best_test_acc: float   # 100 - min_test_top1
    epochs: int            # len(test_ep_top1)
    params: int | None
    flops: int | None
    drop_prob: float | None
    position: int          # entry number in the file (top entries first)


def loose_ends(entries: Sequence[tuple[str, int]]) -> tuple[int, ...]:
    """The nodes (as state indices) that no node of the cell takes as an input."""
    nodes = len(entries) // 2
    used = {i for _, i in entries}
    return tuple(s for s in range(2, 2 + nodes) if s not in used)


_SUFFIX_RE = re.compile(r"\s+(width|depth|aux)\s*=\s*(\S+)\s*$")


def parse_model(text: str) -> NDSModel:
    """An ``NDSModel`` from an arch string: a genotype, optionally followed by ``width=W depth=D aux=0|1``
    (bare: the DARTS evaluation network, width 36, depth 20, no auxiliary head)."""
    settings: dict[str, str] = {}
    rest = text.strip()
    while (match := _SUFFIX_RE.search(rest)) is not None:
        if match.group(1) in settings:
            raise ValueError(f"{match.group(1)} given twice")
        settings[match.group(1)] = match.group(2)
        rest = rest[:match.start()]
    genotype = parse_genotype(rest)
    try:
        width = int(settings.get("width", DEFAULT_WIDTH))
        depth = int(settings.get("depth", DEFAULT_DEPTH))
    except ValueError:
        raise ValueError(f"width and depth must be integers, got {settings}") from None
    aux_text = settings.get("aux", "0").lower()
    if aux_text not in ("0", "1", "false", "true"):
        raise ValueError(f"aux must be 0 or 1, got {aux_text!r}")
    return NDSModel(genotype, width, depth, aux_text in ("1", "true"))


# ----------------------------------------------------------------------------------------------- result files
def load_results(path: str | os.PathLike) -> list[NDSResult]:
    """The entries of one official NDS result file (a JSON list of entries, or ``{"top": [...], "mid":
    [...]}`` read as top then mid). Each entry needs ``net`` with ``genotype`` (``normal``, ``normal_concat``,
    ``reduce``, ``reduce_concat``), ``width``, ``depth`` and ``aux``, and ``test_ep_top1`` (top-1 error in %
    per epoch); ``min_test_top1``, ``params``, ``flops`` and ``net.drop_prob`` are read when present.
    Raises NDSFileError (one line, naming the file and entry) for anything else."""
    path = Path(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise NDSFileError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    except UnicodeDecodeError:
        raise NDSFileError(f"{path} is not a JSON text file") from None
    if isinstance(data, dict):
        if set(data) != {"top", "mid"} or not all(isinstance(data[k], list) for k in data):
            raise NDSFileError(f"{path}: expected a list of entries or {{'top': [...], 'mid': [...]}}, got keys "
                               f"{sorted(data)[:5]}")
        data = data["top"] + data["mid"]
    if not isinstance(data, list) or not data:
        raise NDSFileError(f"{path}: expected a non-empty list of entries")
    return [_entry(path, k, entry) for k, entry in enumerate(data)]


def _entry(path: Path, k: int, entry) -> NDSResult:
    where = f"{path.name} entry {k}"
    try:
        net = entry["net"]
        g = net["genotype"]
        genotype = genotype_from_lists(g["normal"], g["normal_concat"], g["reduce"], g["reduce_concat"])
        width, depth, aux = net["width"], net["depth"], net["aux"]
        errors = entry["test_ep_top1"]
    except (KeyError, TypeError) as error:
        raise NDSFileError(f"{where}: not an NDS cell-model entry (missing {error})") from None
    except ValueError as error:
        raise NDSFileError(f"{where}: {error}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, depth)) \
            or not isinstance(aux, (bool, int)):
        raise NDSFileError(f"{where}: width and depth must be positive integers and aux a boolean")
    if not isinstance(errors, list) or not errors or not all(_is_number(e) for e in errors):
        raise NDSFileError(f"{where}: test_ep_top1 must be a non-empty list of top-1 errors")
    best = entry.get("min_test_top1", min(errors))
    if not _is_number(best):
        raise NDSFileError(f"{where}: min_test_top1 must be a number")
    return NDSResult(NDSModel(genotype, width, depth, bool(aux)), 100.0 - float(errors[-1]), 100.0 - float(best),
                     len(errors), _optional_int(entry.get("params")), _optional_int(entry.get("flops")),
                     net.get("drop_prob"), k)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional_int(value) -> int | None:
    return int(value) if _is_number(value) else None


# ----------------------------------------------------------------------------------------------- the spaces
class NDSSpace(SearchSpace):
    """One NDS design space (``SPACES[name]``); the result file is read from ``nds_dir`` (default: the
    ``GRADSIGN_NDS_DIR`` environment variable) or ``results_file`` when a look-up first needs it."""

    datasets = ("cifar10",)

    def __init__(self, name: str, *, nds_dir: str | os.PathLike | None = None,
                 results_file: str | os.PathLike | None = None):
        if name not in SPACES:
            raise ValueError(f"unknown NDS space {name!r}; known: {', '.join(SPACES)}")
        self.spec = SPACES[name]
        self.name = name
        folder = nds_dir if nds_dir is not None else os.environ.get(ENV_VAR) or None
        self.results_file = Path(results_file) if results_file is not None else (
            Path(folder) / f"{self.spec.file_stem}.json" if folder is not None else None)
        # one decision per (cell, node, entry): op, then input state; then width and depth
        choices: list[tuple[str, ...]] = []
        for _cell in ("normal", "reduce"):
            for node in range(self.spec.nodes):
                for _ in range(2):
                    choices.append(self.spec.ops)
                    choices.append(tuple(str(i) for i in range(node + 2)))
        choices.append(tuple(str(w) for w in WIDTHS))
        choices.append(tuple(str(d) for d in DEPTHS))
        self.choices = tuple(choices)
        self._table: tuple[list[NDSModel], list[list[NDSResult]], dict[str, int]] | None = None

    # -------------------------------------------------------------- models and text
    def model(self, arch: str | int) -> NDSModel:
        """The ``NDSModel`` of an arch string of this space, or of a file index."""
        if isinstance(arch, int) or (isinstance(arch, str) and arch.strip().isdigit()):
            return self._tables()[0][self.index(arch)]
        try:
            model = parse_model(arch)
            self.check(model)
        except ValueError as error:
            raise UnknownArchError(f"not an arch of {self.name}: {error}") from None
        return model

    def check(self, model: NDSModel) -> None:
        """Raise ValueError unless ``model``'s genotype follows this space's rules: its op set, its number of
        nodes, earlier states as inputs and its cell output rule."""
        check_genotype(model.genotype, self.spec.ops)
        for name, reduction in (("normal", False), ("reduce", True)):
            entries, concat = model.genotype.cell(reduction)
            if len(entries) != 2 * self.spec.nodes:
                raise ValueError(f"{name} cell has {len(entries) // 2} nodes; {self.name} cells have {self.spec.nodes}")
            expected = loose_ends(entries) if self.spec.loose_end else tuple(range(2, 2 + self.spec.nodes))
            if tuple(sorted(concat)) != expected:
                rule = "the nodes no other node uses" if self.spec.loose_end else "all nodes"
                raise ValueError(f"{name}_concat {list(concat)} is not {rule} ({list(expected)})")
        if model.width < 1 or model.depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width {model.width}, depth {model.depth}")

    def canonical(self, arch: str) -> str:
        """The arch string with each node's two (op, input) entries in sorted order and the concat lists
        sorted: a node sums its two inputs, so these compute the same function."""
        model = self.model(arch)
        g = model.genotype

        def cell(entries):
            return tuple(e for j in range(0, len(entries), 2) for e in sorted(entries[j:j + 2]))
        genotype = Genotype(cell(g.normal), tuple(sorted(g.normal_concat)), cell(g.reduce),
                            tuple(sorted(g.reduce_concat)))
        return NDSModel(genotype, model.width, model.depth, model.aux).text()

    def encode(self, arch: str) -> tuple[int, ...]:
        """Choice indices (per node entry: op, input state; then width, depth) of a model drawn by this space's
        sampling rules; a model with the auxiliary head or a width or depth outside the sampled options has
        none (UnknownArchError)."""
        model = self.model(arch)
        if model.aux or model.width not in WIDTHS or model.depth not in DEPTHS:
            raise UnknownArchError(f"{self.name}: only sampled models (width in {WIDTHS}, depth in {DEPTHS}, "
                                   "no auxiliary head) have choice indices")
        out: list[int] = []
        for entries in (model.genotype.normal, model.genotype.reduce):
            for op, i in entries:
                out += [self.spec.ops.index(op), i]
        return tuple(out + [WIDTHS.index(model.width), DEPTHS.index(model.depth)])

    def decode(self, choice_indices: Sequence[int]) -> str:
        """The arch string of choice indices (the cell outputs follow from the space's output rule)."""
        if len(choice_indices) != len(self.choices) or not all(
                0 <= int(c) < len(options) for c, options in zip(choice_indices, self.choices)):
            raise UnknownArchError(f"{self.name}: expected {len(self.choices)} choice indices within range")
        per_cell = 4 * self.spec.nodes
        cells = []
        for start in (0, per_cell):
            flat = [int(c) for c in choice_indices[start:start + per_cell]]
            entries = tuple((self.spec.ops[flat[k]], flat[k + 1]) for k in range(0, per_cell, 2))
            concat = loose_ends(entries) if self.spec.loose_end else tuple(range(2, 2 + self.spec.nodes))
            cells.append((entries, concat))
        genotype = Genotype(cells[0][0], cells[0][1], cells[1][0], cells[1][1])
        width, depth = WIDTHS[int(choice_indices[-2])], DEPTHS[int(choice_indices[-1])]
        return NDSModel(genotype, width, depth, False).text()

    def build(self, arch: str | int, *, num_classes: int, width: int | None = None, depth: int | None = None,
              auxiliary: bool | None = None, **options) -> DartsNetwork:
        """The DARTS-family network of ``arch``, freshly initialised; ``width``, ``depth`` and ``auxiliary``
        override the arch string's."""
        if options:
            raise TypeError(f"unknown build options for {self.name}: {', '.join(sorted(options))}")
        model = self.model(arch)
        return build_darts(model.genotype, num_classes=num_classes,
                           width=model.width if width is None else width,
                           depth=model.depth if depth is None else depth,
                           auxiliary=model.aux if auxiliary is None else auxiliary)

    def num_classes(self, dataset: str) -> int:
        """10 (the NDS cell-space files used here are CIFAR-10's)."""
        if dataset not in self.datasets:
            raise UnknownDatasetError(f"{self.name} has no dataset {dataset!r}; known: cifar10")
        return 10

    # -------------------------------------------------------------- the result file
    def _tables(self) -> tuple[list[NDSModel], list[list[NDSResult]], dict[str, int]]:
        if self._table is None:
            path = self.results_file
            if path is None or not path.is_file():
                where = (f"{path} does not exist" if path is not None else
                         f"no folder given (--nds-dir DIR or {ENV_VAR}=DIR)")
                raise NDSFilesMissingError(
                    f"{self.name} needs the NDS result file {self.spec.file_stem}.json: {where}; get data.zip from "
                    f"{NDS_DATA_URL} and put its {self.spec.file_stem}.json in that folder")
            results = load_results(path)
            models: list[NDSModel] = []
            groups: list[list[NDSResult]] = []
            index: dict[str, int] = {}
            for result in results:
                try:
                    self.check(result.model)
                except ValueError as error:
                    raise NDSFileError(f"{path.name} entry {result.position} is not a {self.name} model: "
                                       f"{error}") from None
                key = result.model.text()
                if key in index:
                    groups[index[key]].append(result)
                else:
                    index[key] = len(models)
                    models.append(result.model)
                    groups.append([result])
            self._table = (models, groups, index)
        return self._table

    def has_results(self) -> bool:
        """Whether this space's result file is present (reading it if so)."""
        try:
            self._tables()
        except NDSFilesMissingError:
            return False
        return True

    #: reports use the final test accuracy (the last epoch's; ``query``'s ``epochs=None``)
    default_field = ("test", None)
    final_fields = (("test", None),)
    final_fields_name = "final test accuracy (last epoch), one training run, from the NDS result file"

    def has_table(self, arch: str | int) -> bool:
        """Whether the result file (when present) has ``arch``; False without the file."""
        if isinstance(arch, str) and not arch.strip().isdigit():
            self.model(arch)  # an invalid arch string is an error, not a missing table
        if not self.has_results():
            return False
        try:
            self.index(arch)
        except UnknownArchError:
            return False
        return True

    def resolve(self, arch: str | int) -> str:
        """The arch string of a file index, or of any accepted spelling of an arch string (needs no file)."""
        if isinstance(arch, int) or (isinstance(arch, str) and arch.strip().isdigit()):
            return self.arch(self.index(arch))
        return self.model(arch).text()

    def __len__(self) -> int:
        """Number of distinct models in the result file."""
        return len(self._tables()[0])

    def __iter__(self) -> Iterator[str]:
        return (m.text() for m in self._tables()[0])

    def arch(self, index: int) -> str:
        """Arch string of the model at ``index`` (file order, duplicates merged)."""
        models = self._tables()[0]
        if not 0 <= int(index) < len(models):
            raise UnknownArchError(f"{self.name} index {index} out of range 0..{len(models) - 1}")
        return models[int(index)].text()

    def index(self, arch: str | int) -> int:
        """File index of ``arch`` (an arch string, or an index as int or digit string)."""
        models, _, index = self._tables()
        if isinstance(arch, int) or (isinstance(arch, str) and arch.strip().isdigit()):
            i = int(arch)
            if not 0 <= i < len(models):
                raise UnknownArchError(f"{self.name} index {i} out of range 0..{len(models) - 1}")
            return i
        key = self.model(arch).text()
        if key not in index:
            raise UnknownArchError(f"{self.name}: this model is not in {self.results_file}")
        return index[key]

    def results(self, arch: str | int) -> list[NDSResult]:
        """The file entries of ``arch`` (several when the file trained the same network more than once)."""
        return list(self._tables()[1][self.index(arch)])

    @property
    def duplicates(self) -> int:
        """File entries merged into an earlier entry's model."""
        return sum(len(g) - 1 for g in self._tables()[1])

    def query(self, arch: str | int, dataset: str = "cifar10", metric: str = "test",
              epochs: int | None = None) -> float:
        """CIFAR-10 test accuracy (%) of ``arch`` from the result file, mean over entries of the same network:
        ``metric="test"``: after ``epochs`` epochs (default: the last one; 100 - ``test_ep_top1[epochs - 1]``
        only where ``epochs`` is the number trained); ``metric="best_test"``: 100 - ``min_test_top1``."""
        self.num_classes(dataset)
        if metric not in ("test", "best_test"):
            raise ValueError(f"{self.name} has metrics test and best_test (the NDS files have no validation "
                             f"split), got {metric!r}")
        entries = self.results(arch)
        trained = {e.epochs for e in entries}
        if epochs is not None and trained != {epochs}:
            raise ValueError(f"{self.name}: this model was trained for {sorted(trained)} epochs, not {epochs}; "
                             "its final accuracy is the last epoch's")
        values = [e.test_acc if metric == "test" else e.best_test_acc for e in entries]
        return sum(values) / len(values)

    def benchmark_table(self, dataset: str = "cifar10", metric: str = "test", epochs: int | None = None) -> np.ndarray:
        """``query(·, dataset, metric, epochs)`` of every model, in index order (read-only float64)."""
        table = np.array([self.query(i, dataset, metric, epochs) for i in range(len(self))], dtype=np.float64)
        table.flags.writeable = False
        return table

    def accuracy_field(self, dataset: str, metric: str = "test", epochs: int | None = None) -> str:
        """The name of the accuracy ``query`` returns, as reports print it."""
        what = "final test accuracy (last epoch)" if metric == "test" else "best test accuracy (any epoch)"
        return f"{dataset} {what}, one training run (mean over repeated entries), NDS {self.spec.file_stem}.json"

    def param_check(self, arch: str | int) -> dict:
        """The builder's parameter counts of ``arch`` (with and without the auxiliary head) beside the file's
        ``params``; ``match`` says whether either count equals it (None when the file has no ``params``)."""
        entries = self.results(arch)
        model = self.build(arch, num_classes=10)
        total, without_aux = param_count(model), param_count(model, auxiliary=False)
        published = entries[0].params
        return {"params_file": published, "params": total, "params_without_aux": without_aux,
                "match": None if published is None else published in (total, without_aux)}
