"""Pattern pieces shared by the normalization rules, and the reading of what they matched.

The spellings exporters and model code write for one normalization differ in small ways; the
pieces here hold the alternatives once (as ``pattern.OrValue`` choices) so that each rule is
written once:

- a **mean** over some axes: ``ReduceMean(v)``; ``ReduceMean(v, keepdims=0)`` re-expanded by
  ``Reshape`` + ``Expand`` (dynamo's ``var``/``var_mean``); ``ReduceSum(v) / n``. The axes may
  be an attribute (opset <= 17) or an input (>= 18) and ``keepdims`` may be omitted (default 1):
  nothing about them is written in the pattern, :func:`read_site` checks them.
- a **variance** (``mean((x - mean(x))^2)``, square as ``Pow(d, 2)`` or ``Mul(d, d)``) or a
  **mean square** (``mean(x^2)``); also the unbiased variance ``mean(d^2) * n / (n - 1)``
  (``x.var()``/``x.std()``), matched so that it can be refused with its name;
- the **normalizer**: ``Sqrt(var + eps)`` (or without eps), ``Reciprocal`` of it,
  ``Div(1, .)`` (TorchScript's rsqrt), ``Pow(var + eps, -0.5)``; and ``Sqrt(var) + eps`` (eps on
  the standard deviation), matched to be refused;
- the **normalized** value ``num / std`` or ``num * inv`` (either operand order), where ``num``
  is the centred (or raw) input, possibly already multiplied by a constant scale.

Matched values are bound under names that start with a tag, and :func:`read_site` turns the
bindings into a :class:`Site` (axes, eps, scale), or raises :class:`~normfold.errors.Refusal`
with the reason the match is not exact.
"""

from __future__ import annotations

__all__ = [
    "Site",
    "centred",
    "mean_of",
    "mean_square",
    "normalized",
    "numerator",
    "read_site",
    "restored",
    "variance",
]

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from normfold.errors import Refusal
from normfold.passes import _norm_checks as checks

_ANY = dict(_allow_other_inputs=True, _allow_other_attributes=True)


def restored(op, value, name: str):
    """``value`` or ``Expand(Reshape(value, s1), s2)`` (a keepdims=0 reduction re-expanded)."""
    reshaped = op.Reshape(value, _allow_other_inputs=True, _allow_other_attributes=True)
    return pattern.OrValue([value, op.Expand(reshaped, _allow_other_inputs=True, _outputs=[name])])


def mean_of(op, v, tag: str):
    """The mean of ``v`` over some axes, in the spellings exporters write (see module doc)."""
    by_mean = op.ReduceMean(v, **_ANY, _outputs=[f"{tag}_rm"])
    by_sum = op.ReduceSum(v, **_ANY, _outputs=[f"{tag}_rs"])
    return pattern.OrValue(
        [restored(op, by_mean, f"{tag}_rmx"), op.Div(restored(op, by_sum, f"{tag}_rsx"), pattern.Var(f"{tag}_n"))]
    )


def _square(op, v):
    return pattern.OrValue([op.Pow(v, pattern.Var("two")), op.Mul(v, v)])


def _unbiased(op, mean):
    return op.Div(op.Mul(mean, pattern.Var("unbiased_n")), pattern.Var("unbiased_d"), _outputs=["unbiased"])


def _maybe_unbiased(op, mean):
    scaled = _unbiased(op, mean)
    return pattern.OrValue([mean, scaled, op.Expand(op.Reshape(scaled, **_ANY), _allow_other_inputs=True,
                                                            _outputs=["unbiased_x"])])


def centred(op, x, tag: str):
    """``x - mean(x)``."""
    return op.Sub(x, mean_of(op, x, tag))


def variance(op, x):
    """``mean((x - mean(x))^2)`` or its unbiased rescaling (to be refused)."""
    return _maybe_unbiased(op, mean_of(op, _square(op, centred(op, x, "mv")), "var"))


def mean_square(op, x):
    """``mean(x^2)`` or its unbiased rescaling (to be refused)."""
    return _maybe_unbiased(op, mean_of(op, _square(op, x), "var"))


def _with_eps(op, var):
    return pattern.OrValue([op.Add(var, pattern.Var("eps")), op.Add(pattern.Var("eps"), var), var])


def normalized(op, num, var, form: str):
    """``num`` divided by the standard deviation from ``var``; ``form`` picks the root op.

    ``div``: ``Div(num, std)``; ``mul``: ``Mul(num, inv)``; ``rmul``: ``Mul(inv, num)``;
    ``any``: any of these (for use below a rule's root).
    """
    var_eps = _with_eps(op, var)
    sqrt = op.Sqrt(var_eps)
    eps_on_std = pattern.OrValue(
        [op.Add(op.Sqrt(var), pattern.Var("eps_std")), op.Add(pattern.Var("eps_std"), op.Sqrt(var))]
    )
    std = pattern.OrValue([sqrt, eps_on_std])
    inv = pattern.OrValue(
        [op.Reciprocal(std), op.Div(pattern.Var("one"), std), op.Pow(var_eps, pattern.Var("mhalf"))]
    )
    forms = {
        "div": lambda: op.Div(num, std),
        "mul": lambda: op.Mul(num, inv),
        "rmul": lambda: op.Mul(inv, num),
    }
    if form == "any":
        return pattern.OrValue([forms["div"](), forms["mul"](), forms["rmul"]()])
    return forms[form]()


def numerator(op, v):
    """``v``, or ``v`` times a constant scale applied before the division (``w * d / std``)."""
    return pattern.OrValue([v, op.Mul(v, pattern.Var("pre")), op.Mul(pattern.Var("pre"), v)])


@dataclasses.dataclass(frozen=True)
class Site:
    """What a matched normalization computes: normalized axes, eps, and a scale applied inside."""

    axes: tuple[int, ...]
    epsilon: float
    pre_scale: np.ndarray | None
    spelling: str


_REDUCE_TAGS = ("mn", "mv", "var")


def _dims_of_ranked(x: ir.Value) -> list[checks.Dim]:
    """The dims of ``x``, whose rank is known. Read only where a dim is used, so that a site
    decided on its rank alone does not wait for the shapes to be completed."""
    x_dims = checks.dims(x)
    assert x_dims is not None, "read after checks.rank(x)"
    return x_dims


def read_site(bindings: Mapping[str, Any], x: ir.Value, kind: str) -> Site | None:
    """Check a match of :func:`normalized` over ``x`` and describe it; :class:`Refusal` with the
    reason when it is refused, None when the match is no normalization at all.

    ``kind`` is "LayerNorm" or "RMSNorm" (for the messages). Checks: x is a float tensor of
    known rank; every reduction has the same axes and keeps its dims (or is re-expanded to the
    shape of x with those axes set to 1); a ReduceSum is divided by exactly the number of
    reduced elements; the square is a square; eps is a float scalar constant carried exactly;
    the rsqrt exponent is -0.5; no unbiased variance and no eps on the standard deviation.
    """
    if x.dtype not in checks.FLOAT_TYPES:
        raise Refusal(f"input {x.name!r} is not a float tensor (dtype {x.dtype})")
    rank = checks.rank(x)
    if rank is None:
        raise Refusal(f"the rank of input {x.name!r} is unknown")
    if bindings.get("unbiased") is not None:
        n, d = checks.scalar(bindings.get("unbiased_n")), checks.scalar(bindings.get("unbiased_d"))
        raise Refusal(
            f"unbiased variance (rescaled by {n:g}/{d:g}, as x.var() and x.std() compute): "
            f"{kind} divides by N, not N - 1"
            if n is not None and d is not None
            else f"the variance is rescaled by a non-constant factor: not a {kind}"
        )
    if bindings.get("eps_std") is not None:
        raise Refusal(f"eps is added to the standard deviation, not to the variance: not a {kind}")
    axes: tuple[int, ...] | None = None
    dropped: set[ir.Node] = set()
    restores: set[ir.Value] = set()
    for tag in _REDUCE_TAGS:
        for suffix in ("rm", "rs"):
            value = bindings.get(f"{tag}_{suffix}")
            if value is None:
                continue
            node = value.producer()
            found = checks.reduce_axes(node, rank)
            if axes is None:
                axes = found
            elif found != axes:
                raise Refusal(f"the mean and the variance reduce different axes ({list(axes)} and {list(found)})")
            if checks.keepdims(node) == 0:
                dropped.add(node)
            if suffix == "rs":
                count = checks.static_dims(x, found)
                divisor = checks.scalar(bindings.get(f"{tag}_n"))
                if count is None:
                    raise Refusal("a ReduceSum divides by a count, but the reduced dims are not static")
                if divisor != math.prod(count):
                    raise Refusal(f"a ReduceSum is divided by {divisor}, not by the {math.prod(count)} reduced elements")
        for suffix in ("rmx", "rsx"):
            if bindings.get(f"{tag}_{suffix}") is not None:
                restores.add(bindings[f"{tag}_{suffix}"])
    if axes is None:
        raise Refusal("no reduction found")
    if len(restores) != len(dropped):
        raise Refusal("a ReduceMean with keepdims=0 is broadcast back against the input without its axis")
    for value in restores:
        got = checks.dims(value)
        wanted = [1 if i in axes else d for i, d in enumerate(_dims_of_ranked(x))]
        if got is None or len(got) != rank or not all(
            (w == 1 and g == 1) or checks.same_dim(g, w) for g, w in zip(got, wanted)
        ):
            raise Refusal(f"cannot prove that {value.name!r} re-expands the reduction to the input's shape")
    for name, wanted, what in (("two", 2.0, "power"), ("one", 1.0, "numerator"), ("mhalf", -0.5, "power")):
        if bindings.get(name) is None:
            continue
        found = checks.scalar(bindings[name])
        if found is None:
            return None  # a power or numerator computed at run time: another computation
        if found != wanted:
            raise Refusal(f"the {what} is {found!r} where {kind} has {wanted!r}")
    eps_value = bindings.get("eps")
    epsilon = 0.0
    if eps_value is not None:
        array = checks.constant(eps_value)
        if array is None:
            raise Refusal(f"eps {eps_value.name!r} is computed at run time, not a constant")
        if array.size != 1 or array.ndim > rank:
            raise Refusal(f"eps {eps_value.name!r} has shape {list(array.shape)}, not a scalar")
        epsilon = float(array.reshape(()))
        if not checks.float32_exact(epsilon):
            raise Refusal(f"eps {epsilon!r} is not exactly representable in the float attribute epsilon")
    pre = bindings.get("pre")
    pre_scale = None
    if pre is not None:
        array = checks.constant(pre)
        if array is None:
            raise Refusal("the numerator is scaled by a value computed at run time before the division")
        laid_out = checks.affine_operand(array, _dims_of_ranked(x), axes, "the scale applied before the division")
        pre_scale = laid_out.astype(np.float64)
    parts = []
    if bindings.get("var_rs") is not None or bindings.get("mn_rs") is not None:
        parts.append("sum/n")
    if restores:
        parts.append("keepdims=0 re-expanded")
    if eps_value is None:
        parts.append("no eps")
    return Site(axes, epsilon, pre_scale, ", ".join(parts))
