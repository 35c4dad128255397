"""Rank the user's own candidate models on the user's own data with zero-cost proxies (``gradsign rank``).

Protocol (``rank``): one canonical batch is drawn from the data (``gradsign.userdata.draw_batch``: seeded,
classes balanced where there are class labels, normalised as asked or by the batch's per-channel
statistics). Every candidate is built right after ``torch.manual_seed(seed)`` (``gradsign.candidates``),
checked on two samples of the batch (its output must have the targets' shape and the loss must give a
scalar), then scored by ``gradsign.scores`` on the same batch with the same seed, plus its number of
trainable parameters and multiply-accumulates (the ``params`` and ``flops`` proxies). A candidate that
fails gets its error (one line) in its row and the others go on; a NaN or infinite score is kept as it
is and left unranked. Warnings logged while a candidate is scored (e.g. the engine falling back to the
per-sample loop) are kept in its ``notes``.

With ``n_inits`` > 1 a candidate given as a builder or configuration is built ``n_inits`` times, under seeds
seed, seed+1, ..., and each proxy is averaged over the builds (the GradSign paper's appendix averages over
several initialisations); one given as a built model is re-drawn by its layers' ``reset_parameters``
(``gradsign.scores``), which a note in its row says.

Ranks: per proxy, 1 is the best score in the proxy's direction (``proxy_info(p).higher_is_better``); ties
share the smallest rank (1, 2, 2, 4). Rows are ordered by the first proxy.
"""
from __future__ import annotations

import copy
import csv
import importlib
import logging
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gradsign.api import OutputFn, default_output, scores
from gradsign.candidates import _one_line, build_model, load_candidates
from gradsign.proxies import get_proxy
from gradsign.userdata import Batch, UserData, draw_batch, load_data

__all__ = ["LOSSES", "Loss", "RankResult", "RankRow", "parse_image_size", "rank", "resolve_loss",
           "score_candidate"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: losses by name: (function on (outputs, targets), the targets it takes; see gradsign.userdata)
LOSSES: dict[str, tuple[LossFn, str]] = {
    "cross-entropy": (F.cross_entropy, "classes"),
    "mse": (F.mse_loss, "values"),
    "bce": (F.binary_cross_entropy_with_logits, "binary"),
}
#: what each row reports beside the requested proxies
SIZE_PROXIES = ("params", "flops")


@dataclass(frozen=True)
class Loss:
    """A loss function, its name, the targets it takes, and whether the output shape must equal theirs."""

    name: str
    fn: LossFn
    target_kind: str
    check_shape: bool = True


def resolve_loss(loss: str | LossFn = "cross-entropy", target_kind: str | None = None) -> Loss:
    """A loss by name (``LOSSES``: cross-entropy on class indices, mse on values, bce on 0/1 targets with
    logits), or ``module:function`` / ``FILE.py:function`` / a callable ``fn(outputs, targets) -> scalar``.
    A user's loss takes class indices unless ``target_kind`` says otherwise ("classes", "binary",
    "values"), and its output shape is not checked."""
    if callable(loss):
        return Loss(getattr(loss, "__name__", "custom"), loss, target_kind or "classes", False)
    if loss in LOSSES:
        fn, kind = LOSSES[loss]
        if target_kind not in (None, kind):
            raise ValueError(f"loss {loss} takes {kind} targets, not {target_kind}")
        return Loss(loss, fn, kind)
    source, sep, attr = str(loss).rpartition(":")
    if not sep or not source or not attr.isidentifier():
        raise ValueError(f"unknown loss {loss!r}; choose {', '.join(LOSSES)} or module:function")
    if source.endswith(".py") or "/" in source:
        from gradsign.candidates import _load_file
        module = _load_file(Path(source), "loss file")
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise ValueError(f"cannot import the loss module {source}: {error}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{source} has no function {attr} for the loss")
    return Loss(str(loss), fn, target_kind or "classes", False)


@dataclass
class RankRow:
    """One candidate: its scores and ranks per proxy (rank None: failed or not finite), trainable parameters,
    multiply-accumulates per sample / 1e6, wall-clock seconds for everything done for it (build, fit check,
    proxies, size), its one-line error if it failed, and notes (warnings raised while it was scored)."""

    candidate: str
    scores: dict[str, float]
    ranks: dict[str, int | None]
    n_params: int | None = None
    flops_mmac: float | None = None
    seconds: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class RankResult:
    """Rows in rank order of the first proxy, with the protocol that produced them."""

    rows: list[RankRow]
    proxies: tuple[str, ...]
    batch: str
    loss: str
    seed: int
    n_inits: int

    @property
    def primary(self) -> str:
        return self.proxies[0]

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data; NaN and infinite scores (which JSON lacks) become None (null)."""
        return {"batch": self.batch, "loss": self.loss, "seed": self.seed, "n_inits": self.n_inits,
                "ranked_by": self.primary,
                "proxies": {p: {"higher_is_better": _higher_is_better(p)} for p in self.proxies},
                "candidates": [_json_row(r, self.primary) for r in self.rows]}

    def format_table(self) -> str:
        direction = "higher" if _higher_is_better(self.primary) else "lower"
        lines = [f"data: {self.batch}",
                 f"loss {self.loss}, seed {self.seed}, n_inits {self.n_inits}; ranked by {self.primary} "
                 f"({direction} is better); score (rank) per proxy; MMACs: multiply-accumulates per sample / 1e6",
                 "| rank | candidate | " + " | ".join(self.proxies) + " | #params | MMACs | seconds | error |",
                 "|---" * (len(self.proxies) + 6) + "|"]
        for row in self.rows:
            cells = [str(row.ranks.get(self.primary) or "-"), row.candidate]
            cells += [f"{_number(row.scores.get(p, math.nan))} ({row.ranks.get(p) or '-'})" for p in self.proxies]
            cells += [f"{row.n_params:,}" if row.n_params is not None else "-",
                      _number(row.flops_mmac) if row.flops_mmac is not None else "-",
                      f"{row.seconds:.2f}", row.error or ""]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{row.candidate}: {note}" for row in self.rows for note in row.notes]
        lines += [f"note: {n}" for n in notes]
        lines += [f"note: {e.describe()}: the {sum(r.error is None for r in self.rows)} candidates scored here"
                  for e in _ensembles(self.proxies)]
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "candidate"] + [c for p in self.proxies for c in (p, f"{p}_rank")]
                            + ["n_params", "flops_mmac", "seconds", "error", "notes"])
            for row in self.rows:
                writer.writerow([row.ranks.get(self.primary) or "", row.candidate]
                                + [c for p in self.proxies for c in (repr(row.scores.get(p, math.nan)),
                                                                    row.ranks.get(p) or "")]
                                + [row.n_params if row.n_params is not None else "",
                                   repr(row.flops_mmac) if row.flops_mmac is not None else "",
                                   f"{row.seconds:.3f}", row.error or "", "; ".join(row.notes)])

    def plot(self, path: str | Path) -> None:
        """Each proxy's score against the number of parameters (log scale), one panel per proxy."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(3, len(self.proxies))
        rows = math.ceil(len(self.proxies) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
        for ax, proxy in zip(axes.flat, self.proxies):
            points = [(r.n_params, r.scores[proxy], r.candidate) for r in self.rows
                      if r.n_params and math.isfinite(r.scores.get(proxy, math.nan))]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=18)
                for x, y, name in points:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
                ax.set_xscale("log")
                values = [p[1] for p in points]
                if min(values) > 0 and max(values) / min(values) > 100:
                    ax.set_yscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel(f"{proxy} score")
            ax.set_title(proxy)
        for ax in list(axes.flat)[len(self.proxies):]:
            ax.set_visible(False)
        fig.suptitle(f"{len(self.rows)} candidates, loss {self.loss}, seed {self.seed}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def rank(candidates: str | Sequence[str] | Mapping[str, Any] | Callable[..., Mapping[str, Any]],
         data: str | Path | UserData | tuple[Any, Any], *, target: str | None = None,
         loss: str | LossFn = "cross-entropy", target_kind: str | None = None,
         proxies: Sequence[str] = ("gradsign",), batch_size: int = 64, seed: int = 0, n_inits: int = 1,
         normalize: str = "batch", image_size: tuple[int, int] | None = None,
         output_fn: OutputFn = default_output, device: str = "cpu", workers: int = 1, threads: int | None = None,
         progress: Callable[[Iterable, int], Iterable] | None = None, **options) -> RankResult:
    """Score and rank candidate models on one canonical batch of the user's data (module docstring).

    ``candidates``: spec string(s) (``gradsign.candidates``: ``FILE.py[:NAME]``, ``module[:NAME]``,
    ``[LABEL=]module:Callable(literals)``), a dict ``{name: model, builder or transformers config}`` or a
    function ``candidates(num_classes)``. ``data``: an image folder, ``.npz`` or ``.csv`` path
    (``gradsign.userdata``), a loaded ``UserData``, or an ``(x, y)`` pair of arrays. ``loss``: see
    ``resolve_loss``. ``options`` go to the proxies (e.g. ``aggregation="mean"``). ``workers > 1`` scores
    in that many spawned processes with ``threads`` torch threads each (default 1); it needs candidates
    given as spec strings and a loss given by name. Returns a ``RankResult``.
    """
    proxies = tuple(proxies)
    if not proxies:
        raise ValueError("no proxy given")
    ensembles = _ensembles(proxies)
    scored = tuple(dict.fromkeys([p for p in proxies if not _is_ensemble(p)]
                                 + [c for e in ensembles for c in e.components]))
    infos = [get_proxy(p) for p in scored]
    accepted = {o for info in infos for o in info.options}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"option {unknown[0]!r} is not accepted by proxies {', '.join(proxies)}")
    if n_inits < 1:
        raise ValueError(f"n_inits must be >= 1, got {n_inits}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}") from None
    the_loss = resolve_loss(loss, target_kind)
    dataset = _as_user_data(data, target, image_size)
    batch = draw_batch(dataset, batch_size, seed, target_kind=the_loss.target_kind, normalize=normalize)
    specs = [candidates] if isinstance(candidates, (str, Mapping)) or callable(candidates) else list(candidates)
    if not specs:
        raise ValueError("no candidates given")
    found: dict[str, tuple[int, Any]] = {}
    for i, spec in enumerate(specs):
        for name, value in load_candidates(spec, batch.num_outputs, tuple(batch.inputs.shape[1:]),
                                           seed=seed).items():
            if name in found:
                raise ValueError(f"two candidates are named {name!r}")
            found[name] = (i, value)
    job = _Job(scored, the_loss, seed, n_inits, output_fn, device, options)
    if workers > 1:
        if not all(isinstance(s, str) for s in specs) or not isinstance(loss, str):
            raise ValueError("workers > 1 need candidates given as files or modules and a loss given by name")
        rows_iter = _pool_rows(specs, found, batch, job, loss, target_kind, workers, threads or 1)
    else:
        rows_iter = _serial_rows(found, batch, job, threads)
    wrap = progress or (lambda items, total: items)
    rows = list(wrap(rows_iter, len(found)))
    order = {name: i for i, name in enumerate(found)}
    rows.sort(key=lambda r: order[r.candidate])
    for ensemble in ensembles:  # ranked within the candidates scored without error
        ok = [r for r in rows if r.error is None]
        values = ensemble.aggregate({c: [r.scores[c] for r in ok] for c in ensemble.components})
        for row in rows:
            row.scores[ensemble.name] = math.nan
        for row, value in zip(ok, values):
            row.scores[ensemble.name] = float(value)
    proxies = tuple(dict.fromkeys([e.name if e is not None else p for p, e in _named(proxies)] + list(scored)))
    _assign_ranks(rows, proxies)
    rows.sort(key=lambda r: (r.error is not None, r.ranks[proxies[0]] is None,
                             r.ranks[proxies[0]] or 0, order[r.candidate]))
    return RankResult(rows, proxies, batch.description, the_loss.name, seed, n_inits)


@dataclass(frozen=True)
class _Job:
    proxies: tuple[str, ...]
    loss: Loss
    seed: int
    n_inits: int
    output_fn: OutputFn
    device: str
    options: dict


def score_candidate(name: str, value: Any, batch: Batch, job: _Job) -> RankRow:
    """Build, check and score one candidate; any exception becomes the row's one-line error."""
    start = time.perf_counter()
    notes: list[str] = []
    nan = {p: math.nan for p in job.proxies}
    with _capture_warnings(notes):
        try:
            model = build_model(value, batch.num_outputs, seed=job.seed).to(job.device)
            _check_fit(model, batch, job.loss, job.output_fn)
            if job.n_inits > 1 and not isinstance(value, torch.nn.Module):
                values = _mean_over_builds(model, value, batch, job)
            else:
                values = scores(model, batch.inputs, batch.targets, job.proxies, job.loss.fn, n_inits=job.n_inits,
                                seed=job.seed, output_fn=job.output_fn, **job.options)
                if job.n_inits > 1:
                    notes.append(f"given as a built model, so its {job.n_inits} initialisations are re-drawn by "
                                 "each layer's reset_parameters, not by the model's own init; give a builder")
            size = scores(model, batch.inputs, batch.targets, SIZE_PROXIES, job.loss.fn, seed=job.seed,
                          output_fn=job.output_fn)
        except Exception as error:
            return RankRow(name, nan, {}, seconds=time.perf_counter() - start, error=_one_line(error),
                           notes=notes)
    return RankRow(name, values, {}, n_params=int(round(size["params"] * 1e6)), flops_mmac=size["flops"],
                   seconds=time.perf_counter() - start, notes=notes)


def _mean_over_builds(model: torch.nn.Module, value: Any, batch: Batch, job: _Job) -> dict[str, float]:
    """Each proxy averaged over ``n_inits`` builds of the candidate under seeds seed, seed+1, ... (the model's
    own initialisation each time); ``model`` is the first build."""
    runs = []
    for i in range(job.n_inits):
        built = model if i == 0 else build_model(value, batch.num_outputs, seed=job.seed + i).to(job.device)
        runs.append(scores(built, batch.inputs, batch.targets, job.proxies, job.loss.fn, seed=job.seed + i,
                           output_fn=job.output_fn, **job.options))
    return {p: math.fsum(run[p] for run in runs) / job.n_inits for p in job.proxies}


def _check_fit(model: torch.nn.Module, batch: Batch, loss: Loss, output_fn: OutputFn) -> None:
    """Forward two samples through an eval-mode copy: the output must have the targets' shape and the loss
    must be a scalar (the caller's model is not changed)."""
    probe = copy.deepcopy(model).eval()
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    n = min(2, len(batch.inputs))
    x, t = batch.inputs[:n].to(device), batch.targets[:n].to(device)
    with torch.no_grad():
        out = output_fn(probe(x))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model's output is a {type(out).__name__}, not a tensor")
        expected = (n, batch.num_outputs)
        if loss.check_shape and tuple(out.shape) != expected:
            what = f"{batch.num_outputs} classes" if loss.target_kind == "classes" else f"{expected[1]} targets"
            raise ValueError(f"output shape {tuple(out.shape)} does not fit {what}: expected {expected}")
        value = loss.fn(out, t)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"the loss gives {getattr(value, 'shape', type(value).__name__)}, not a scalar")


class _capture_warnings:
    """Collect into ``notes`` the warnings of the ``gradsign`` logger (lowering its level to WARNING and, then,
    keeping them off the console for the duration) and the ``UserWarning``s raised while scoring; other
    warnings (deprecations of the libraries a model uses) are shown as usual."""

    def __init__(self, notes: list[str]):
        self.notes = notes
        self.logger = logging.getLogger("gradsign")
        self.handler = _ListHandler(notes)
        self.caught = warnings.catch_warnings(record=True)

    def __enter__(self):
        self.saved = (self.logger.level, self.logger.propagate)
        if self.logger.getEffectiveLevel() > logging.WARNING:
            self.logger.setLevel(logging.WARNING)
            self.logger.propagate = False
        self.logger.addHandler(self.handler)
        self.records = self.caught.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        self.caught.__exit__(*exc)
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        for record in self.records:
            if record.category is UserWarning:
                self.notes.append(str(record.message).splitlines()[0])
            else:
                warnings.showwarning(record.message, record.category, record.filename, record.lineno)


class _ListHandler(logging.Handler):
    def __init__(self, notes: list[str]):
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(record.getMessage().splitlines()[0])


def _assign_ranks(rows: list[RankRow], proxies: Sequence[str]) -> None:
    for proxy in proxies:
        sign = 1.0 if _higher_is_better(proxy) else -1.0
        finite = [sign * r.scores[proxy] for r in rows if r.error is None and math.isfinite(r.scores[proxy])]
        for row in rows:
            value = row.scores.get(proxy, math.nan)
            if row.error is None and math.isfinite(value):
                row.ranks[proxy] = 1 + sum(v > sign * value for v in finite)
            else:
                row.ranks[proxy] = None


def _serial_rows(found: dict[str, tuple[int, Any]], batch: Batch, job: _Job, threads: int | None):
    before = torch.get_num_threads()
    try:
        for name, (_, value) in found.items():
            torch.set_num_threads(threads or before)
            yield score_candidate(name, value, batch, job)
    finally:
        torch.set_num_threads(before)


# Worker processes: each loads the candidates itself (under the same seed) and scores them by name.
_worker: dict = {}


def _init_worker(specs: list[str], batch: Batch, job: _Job, loss: str, target_kind: str | None,
                 threads: int) -> None:
    from gradsign.proxies.registry import load_plugins

    load_plugins()
    torch.set_num_threads(threads)
    _worker.update(specs=specs, batch=batch, job=replace(job, loss=resolve_loss(loss, target_kind)), loaded={})


def _score_in_worker(name: str, spec_index: int) -> RankRow:
    loaded = _worker["loaded"]
    batch: Batch = _worker["batch"]
    if spec_index not in loaded:
        loaded[spec_index] = load_candidates(_worker["specs"][spec_index], batch.num_outputs,
                                             tuple(batch.inputs.shape[1:]), seed=_worker["job"].seed)
    return score_candidate(name, loaded[spec_index][name], batch, _worker["job"])


def _pool_rows(specs: list[str], found: dict[str, tuple[int, Any]], batch: Batch, job: _Job, loss: str,
               target_kind: str | None, workers: int, threads: int):
    shipped = replace(job, loss=None)  # a loss by name is resolved again in each worker
    with ProcessPoolExecutor(min(workers, len(found)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(specs, batch, shipped, loss, target_kind, threads)) as pool:
        futures = {pool.submit(_score_in_worker, name, i): name for name, (i, _) in found.items()}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as error:  # the worker died, or the row could not be sent back
                yield RankRow(futures[future], {p: math.nan for p in job.proxies}, {},
                              error=f"worker failed: {_one_line(error)}")


def _as_user_data(data: Any, target: str | None, image_size: tuple[int, int] | None) -> UserData:
    if isinstance(data, UserData):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        x, y = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in data)
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length ({len(x)} and {len(y)})")
        return UserData("arrays", "arrays", y, x=x)
    return load_data(data, target=target, image_size=image_size)


def _is_ensemble(name: str) -> bool:
    """An ensemble name (``ensemble``, ``ensemble:...``) of ``gradsign.ensemble``, where that module exists."""
    try:
        from gradsign.ensemble import is_ensemble_name
    except ImportError:
        return False
    return is_ensemble_name(name)


def _named(names: Sequence[str]) -> list[tuple[str, Any]]:
    from_names = []
    for name in names:
        if _is_ensemble(name):
            from gradsign.ensemble import parse_ensemble
            from_names.append((name, parse_ensemble(name)))
        else:
            from_names.append((name, None))
    return from_names


def _ensembles(names: Sequence[str]) -> list[Any]:
    return list(dict.fromkeys(e for _, e in _named(names) if e is not None))


def _higher_is_better(name: str) -> bool:
    return True if _is_ensemble(name) else get_proxy(name).higher_is_better


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == round(value) and abs(value) < 1e15:
        return f"{value:.0f}"
    return f"{value:.4g}"


def _json_row(row: RankRow, primary: str) -> dict[str, Any]:
    out = {"rank": row.ranks.get(primary), **asdict(row)}
    out["scores"] = {p: (v if math.isfinite(v) else None) for p, v in row.scores.items()}
    return out


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``"32"`` -> (32, 32); ``"32,24"`` or ``"32x24"`` -> (32, 24) as (height, width); None stays None."""
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image size must be N or H,W with positive integers, got {text!r}")
    return size
