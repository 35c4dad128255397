"""Candidate models for ``gradsign rank``: from a Python file or module, or one model from a library call.

Specs (``load_candidates``):

* ``FILE.py`` or ``package.module``: the file or module's ``candidates(num_classes)`` (or
  ``candidates(num_classes, input_shape)``, if it has a parameter named ``input_shape``: the shape of one
  sample, e.g. (3, 32, 32) or (F,)) returns ``{name: model}``;
* ``FILE.py:NAME`` or ``package.module:NAME``: the same with the function ``NAME``, or ``NAME`` may be such a
  dict itself;
* ``[LABEL=]module:CALLABLE(literal arguments)``: one candidate, the result of that call, e.g.
  ``transformers:ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16)`` or
  ``torchvision.models:resnet18(num_classes=10)``. Arguments are Python literals (``ast.literal_eval``);
  the candidate is named LABEL, or the call text.

A model in the dict (or returned by a call) may be an ``nn.Module``, a builder (a function of no arguments
returning one) or a ``transformers`` configuration: a configuration gets ``num_labels=num_classes`` unless it
sets ``num_labels``, and becomes ``AutoModelForImageClassification.from_config(config)`` (or, for a text
model, ``AutoModelForSequenceClassification``). A ``transformers`` model class called with keyword
arguments (``transformers:ResNetForImageClassification(depths=[1])``) is built from its own configuration
class with those arguments.

Reproducibility: ``candidates(...)`` is called, and every builder is called, right after
``torch.manual_seed(seed)`` (inside ``torch.random.fork_rng``, so the caller's RNG is untouched). A builder's
weights therefore depend on the seed alone; models already built inside ``candidates(...)`` depend on the
seed and on the order they are built in. Prefer builders (``lambda: Net(...)``).
"""
from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CandidateError", "build_model", "load_candidates", "parse_call"]

Builder = Callable[[], Any]
_LABELLED = re.compile(r"^([\w.\-]+)=(.+)$", re.S)
_CALL = re.compile(r"^([\w.]+):(\w+)\s*\((.*)\)\s*$", re.S)


class CandidateError(ValueError):
    """Candidates that cannot be loaded (one-line message)."""


def load_candidates(spec: str | Mapping[str, Any] | Callable[..., Mapping[str, Any]], num_classes: int,
                    input_shape: tuple[int, ...], *, seed: int = 0) -> dict[str, Any]:
    """``{name: model, builder or config}`` from a spec string (see the module docstring), a dict, or a
    function ``candidates(num_classes[, input_shape])``; the function runs under ``torch.manual_seed(seed)``."""
    if isinstance(spec, Mapping):
        return _checked(dict(spec), "the candidates dict")
    if callable(spec):
        return _checked(_call_candidates(spec, num_classes, input_shape, seed, getattr(spec, "__name__", "")),
                        getattr(spec, "__name__", "candidates"))
    if not isinstance(spec, str) or not spec.strip():
        raise CandidateError(f"candidates must be a file, a module or a dict, got {spec!r}")
    spec = spec.strip()
    label, text = _split_label(spec)
    call = _CALL.match(text)
    if call:
        module_name, attr, args = call.groups()
        target = getattr(_import_module(module_name), attr, None)
        if target is None:
            raise CandidateError(f"module {module_name} has no {attr}")
        return {label or text: _CallBuilder(module_name, attr, target, args, num_classes)}
    if label:
        raise CandidateError(f"a LABEL= prefix names a single call such as transformers:ResNetConfig(...), "
                             f"not {text}")
    source, _, attr = text.rpartition(":") if _has_attr_suffix(text) else (text, "", "")
    module = _load_file(Path(source)) if _is_file(source) else _import_module(source)
    attr = attr or "candidates"
    if not hasattr(module, attr):
        hint = "define candidates(num_classes) returning {name: model}, or name one after a colon"
        raise CandidateError(f"{source} defines no {attr}; {hint}")
    found = getattr(module, attr)
    if isinstance(found, Mapping):
        return _checked(dict(found), f"{source}:{attr}")
    if not callable(found):
        raise CandidateError(f"{source}:{attr} is neither a dict nor a function")
    where = f"{source}:{attr}"
    return _checked(_call_candidates(found, num_classes, input_shape, seed, where), where)


def build_model(value: Any, num_classes: int, *, seed: int) -> nn.Module:
    """An ``nn.Module`` from a candidate value (module, builder or transformers configuration), built right
    after ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = value() if callable(value) and not isinstance(value, nn.Module) else value
        if _is_transformers_config(model):
            model = _model_from_config(model, num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"candidate is a {type(model).__name__}, not an nn.Module, a builder or a "
                        "transformers configuration")
    return model


def parse_call(args: str) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments of a call's argument text, each a Python literal."""
    try:
        tree = ast.parse(f"f({args})", mode="eval").body
    except SyntaxError:
        raise CandidateError(f"cannot parse the arguments ({args})") from None
    try:
        positional = [ast.literal_eval(a) for a in tree.args]
        keywords = {k.arg: ast.literal_eval(k.value) for k in tree.keywords if k.arg}
    except ValueError:
        raise CandidateError(f"arguments ({args}) must be Python literals (numbers, strings, lists...)") from None
    if any(k.arg is None for k in tree.keywords):
        raise CandidateError(f"arguments ({args}) must be written out, not unpacked with **")
    return positional, keywords


class _CallBuilder:
    """Builds one candidate by calling ``module:attr(args)`` (see the module docstring)."""

    def __init__(self, module_name: str, attr: str, target: Any, args: str, num_classes: int):
        self.text = f"{module_name}:{attr}({args})"
        self.target, self.num_classes = target, num_classes
        self.args, self.kwargs = parse_call(args)

    def __call__(self) -> Any:
        if _is_transformers_model_class(self.target):
            config_class = self.target.config_class
            return self.target(config_class(*self.args, **_with_labels(self.kwargs, self.num_classes)))
        if _is_transformers_config_class(self.target):
            return self.target(*self.args, **_with_labels(self.kwargs, self.num_classes))
        return self.target(*self.args, **self.kwargs)


def _with_labels(kwargs: dict[str, Any], num_classes: int) -> dict[str, Any]:
    return kwargs if "num_labels" in kwargs or "id2label" in kwargs else {**kwargs, "num_labels": num_classes}


def _split_label(spec: str) -> tuple[str | None, str]:
    match = _LABELLED.match(spec)
    return (match.group(1), match.group(2).strip()) if match else (None, spec)


def _has_attr_suffix(text: str) -> bool:
    head, sep, tail = text.rpartition(":")
    return bool(sep and head and tail.isidentifier())


def _is_file(source: str) -> bool:
    return source.endswith(".py") or "/" in source or Path(source).is_file()


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise CandidateError(f"cannot import {name}: {error}") from None
    except Exception as error:  # the module itself raised
        raise CandidateError(f"module {name} raised {_one_line(error)}") from None


def _load_file(path: Path, what: str = "candidates file"):
    """Import a Python file as a fresh module; CandidateError (one line) when it is missing or raises."""
    if not path.is_file():
        raise CandidateError(f"no {what} {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"gradsign_candidates_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CandidateError(f"cannot load {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that classes defined there can be pickled and inspected
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        sys.modules.pop(name, None)
        raise CandidateError(f"{what} {path} raised {_one_line(error)}") from None
    return module


def _call_candidates(fn: Callable[..., Any], num_classes: int, input_shape: tuple[int, ...], seed: int,
                     where: str) -> Any:
    try:
        accepts_shape = "input_shape" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        accepts_shape = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if accepts_shape:
                return fn(num_classes, input_shape=tuple(input_shape))
            return fn(num_classes)
        except (Exception, SystemExit) as error:
            raise CandidateError(f"{where or 'candidates'}({num_classes}) raised {_one_line(error)}") from None


def _checked(found: Any, where: str) -> dict[str, Any]:
    if not isinstance(found, Mapping):
        raise CandidateError(f"{where} returned a {type(found).__name__}, not a dict {{name: model}}")
    if not found:
        raise CandidateError(f"{where} returned no candidates")
    bad = [k for k in found if not isinstance(k, str) or not k]
    if bad:
        raise CandidateError(f"{where}: candidate names must be non-empty strings, got {bad[0]!r}")
    return dict(found)


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _transformers():
    return sys.modules.get("transformers")  # a configuration can only exist if transformers is imported


def _is_transformers_config(value: Any) -> bool:
    tf = _transformers()
    return tf is not None and isinstance(value, tf.PretrainedConfig)


def _is_transformers_config_class(value: Any) -> bool:
    tf = _transformers()
    return tf is not None and inspect.isclass(value) and issubclass(value, tf.PretrainedConfig)


def _is_transformers_model_class(value: Any) -> bool:
    tf = _transformers()
    return tf is not None and inspect.isclass(value) and issubclass(value, tf.PreTrainedModel)


def _model_from_config(config: Any, num_classes: int) -> nn.Module:
    import transformers

    config = copy.deepcopy(config)  # the caller's configuration stays as it was
    if "num_labels" not in config.to_diff_dict() and "id2label" not in config.to_diff_dict():
        config.num_labels = num_classes
    for auto in (transformers.AutoModelForImageClassification, transformers.AutoModelForSequenceClassification):
        try:
            return auto.from_config(config)
        except ValueError:  # no model of this kind for the configuration
            continue
    raise TypeError(f"no image or sequence classification model for {type(config).__name__}")
