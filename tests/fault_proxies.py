"""Proxies that misbehave on purpose, for the fault tests (loaded with GRADSIGN_PLUGINS=fault_proxies).

Which archs misbehave is decided from the model alone: the number of 3x3 average-pooling modules it has
(NAS-Bench-201 networks have one per cell for each avg_pool_3x3 edge: 15 per edge).
"""
import math
import os
import time

from torch import nn

from gradsign.proxies.registry import PROXIES, register


def pools(model: nn.Module) -> int:
    return sum(isinstance(m, nn.AvgPool2d) and m.kernel_size in (3, (3, 3)) for m in model.modules())


def n_params(model: nn.Module) -> float:
    return float(sum(p.numel() for p in model.parameters()))


if "test_raises" not in PROXIES:
    @register("test_raises", formula="#params; raises when the model has avg pools", source="tests",
              uses_targets=False)
    def raises(model, inputs, targets, loss_fn):
        if pools(model):
            raise RuntimeError("injected failure")
        return n_params(model)

    @register("test_nan", formula="#params; NaN or inf for some models", source="tests", uses_targets=False)
    def nan(model, inputs, targets, loss_fn):
        return {0: n_params(model), 15: math.nan}.get(pools(model), math.inf)

    @register("test_crash", formula="#params; kills its process for models with 30+ avg pools",
              source="tests", uses_targets=False)
    def crash(model, inputs, targets, loss_fn):
        if pools(model) >= 30:
            os._exit(7)
        return n_params(model)

    @register("test_slow", formula="#params, after a pause", source="tests", uses_targets=False)
    def slow(model, inputs, targets, loss_fn, *, pause: float = 0.4):
        time.sleep(pause)
        return n_params(model)
