"""Replace hand-written normalization modules with ``nn.LayerNorm`` / ``nn.RMSNorm`` / ``nn.GroupNorm``.

The rule, for a module ``M`` (deep-copied first; ``M`` itself is never changed):

1. A *candidate* is a leaf submodule of ``M`` (``M`` included) that is not already a torch
   normalization and either holds an ``eps`` or ``variance_epsilon`` float, or has "norm" in its
   class name. Other modules are left alone and not reported.
2. A candidate must hold one or two parameters of one shape ``S`` (a weight, then an optional
   bias, in registration order) and a float eps: its ``eps`` / ``variance_epsilon`` attribute,
   else the one literal eps its ``forward`` passes to ``F.layer_norm`` / ``F.rms_norm`` /
   ``F.group_norm`` or adds to a variance inline, read from its ``torch.fx`` trace (a forward
   that does not trace, or holds several eps, has none); otherwise it is refused with the reason.
3. From its parameters the candidate replacements are built, eps carried exactly:
   ``nn.LayerNorm(S)`` (with bias iff there are two parameters), ``nn.RMSNorm(S)`` (one
   parameter), ``nn.RMSNorm(S)`` with weight ``1 + w`` (Gemma's spelling, one parameter), and
   ``nn.GroupNorm(groups, C)`` when the module has an int ``num_groups`` or ``groups`` attribute
   and ``S == (C,)``. The ``1 + w`` weight is computed in float64 and cast once.
4. A replacement is accepted only if it computes what the candidate computes on the probes of
   :mod:`normfold.torch._norm_probes` (``[2, 5, *S]`` and ``[3, *S]``, for GroupNorm
   ``[2, C, 3, 4]`` and ``[1, C, 5, 2]``): within 1e-6 relative in float64 and within a few
   units in the last place in the dtype of the candidate's parameters, so a float32 upcast
   inside a half-precision module must be what the torch op does too. The first candidate
   replacement that agrees wins.
5. Near misses (unbiased variance, eps added to the standard deviation, ``F.normalize`` scaled by
   ``sqrt(d)``, a channels-first LayerNorm over axis 1) agree with no replacement and are
   refused, as is a probe on which the module raises or gives a non-finite output.

Every candidate is reported, replaced or refused with the reason, in a :class:`FuseNormsReport`.
"""

from __future__ import annotations

__all__ = ["FuseNormsReport", "fuse_norms", "fuse_norms_with_report"]

import copy
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.torch._norm_patterns import norm_eps_literals
from normfold.errors import Refusal
from normfold.torch._norm_probes import base_probes, require_match

logger = logging.getLogger(__name__)

_TORCH_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _BatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                nn.InstanceNorm3d, nn.LocalResponseNorm)
_EPS_NAMES = ("eps", "variance_epsilon")
_GROUP_NAMES = ("num_groups", "groups")
_ROOT = "(root)"


@dataclasses.dataclass
class FuseNormsReport:
    """What was replaced and refused, and why.

    From :func:`fuse_norms_with_report` the entries name submodules (``{"module", "as"}``,
    ``{"module", "reason"}``); from :func:`normfold.torch.fuse_norm_calls_with_report` they name
    fx nodes (``{"node", "as"}`` with ``"kept"`` for an affine left in the graph, ``{"node",
    "reason"}``).
    """

    replaced: list[dict[str, str]] = dataclasses.field(default_factory=list)
    refused: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def refuse(self, refusal: Refusal, **where: str) -> None:
        """Report ``refusal`` of the site ``where`` names (``module=...`` or ``node=...``): the one
        place a torch normalization :class:`Refusal` becomes a report entry."""
        self.refused.append({**where, "reason": refusal.reason, **refusal.details})
        logger.info("refused %s: %s", ", ".join(where.values()), refusal.reason)

    def to_dict(self) -> dict[str, Any]:
        return {"replaced": [dict(r) for r in self.replaced], "refused": [dict(r) for r in self.refused]}


def fuse_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its hand-written normalizations replaced by torch's (see module doc)."""
    return fuse_norms_with_report(module)[0]


def fuse_norms_with_report(module: nn.Module) -> tuple[nn.Module, FuseNormsReport]:
    """:func:`fuse_norms` and the report of every candidate, replaced or refused with its reason."""
    result = copy.deepcopy(module)
    report = FuseNormsReport()
    replacements: dict[str, nn.Module] = {}
    for name, sub in result.named_modules():
        if not _is_candidate(sub):
            continue
        label = name or _ROOT
        try:
            found = _replacement(sub)
        except Refusal as refusal:
            report.refuse(refusal, module=label)
            continue
        replacements[name] = found
        report.replaced.append({"module": label, "as": _describe(found)})
    for name, new in replacements.items():
        if not name:
            return new, report
        parent_name, _, attr = name.rpartition(".")
        setattr(result.get_submodule(parent_name), attr, new)
    return result, report


def _is_candidate(module: nn.Module) -> bool:
    if isinstance(module, _TORCH_NORMS) or next(module.children(), None) is not None:
        return False
    return _eps_attribute(module) is not None or "norm" in type(module).__name__.lower()


def _eps_attribute(module: nn.Module) -> str | None:
    return next((n for n in _EPS_NAMES if isinstance(getattr(module, n, None), float)), None)


def _eps(module: nn.Module) -> float | None:
    name = _eps_attribute(module)
    if name is not None:
        return float(getattr(module, name))
    try:
        traced = fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001  (fx raises TraceError, TypeError, ...: then there is no literal to read)
        return None
    found = set(norm_eps_literals(traced.graph))
    return found.pop() if len(found) == 1 else None


def _replacement(module: nn.Module) -> nn.Module:
    """The torch normalization that computes what ``module`` computes; raises :class:`Refusal`
    saying why when there is none."""
    params = list(module.parameters(recurse=False))
    if not 1 <= len(params) <= 2 or any(p.shape != params[0].shape for p in params):
        shapes = ", ".join(str(tuple(p.shape)) for p in params) or "none"
        raise Refusal(
            f"parameters are not a normalization's affine (a weight and an optional bias of one shape): {shapes}"
        )
    eps = _eps(module)
    if eps is None:
        raise Refusal("no float eps or variance_epsilon attribute, and no one literal eps in its traced forward")
    candidates = _candidates(module, params, eps)
    tried = []
    dtype = params[0].dtype
    for kind, build, shapes in candidates:
        new = build()
        try:
            require_match(module, new, base_probes(shapes, len(shapes[0]) - 2), eps, dtype)
        except Refusal as why:
            tried.append(f"{kind}: {why.reason}")
            continue
        return new
    raise Refusal("outputs match no torch normalization (" + "; ".join(tried) + ")")


_Candidate = tuple[str, Callable[[], nn.Module], list[tuple[int, ...]]]


def _candidates(module: nn.Module, params: list[torch.Tensor], eps: float) -> list[_Candidate]:
    weight = params[0].detach()
    bias = params[1].detach() if len(params) == 2 else None
    shape = tuple(weight.shape)
    dtype = weight.dtype
    last_probes = [(2, 5, *shape), (3, *shape)]

    def layer_norm() -> nn.Module:
        new = nn.LayerNorm(shape, eps=eps, bias=bias is not None, dtype=dtype, device=weight.device)
        _copy(new.weight, weight)
        if bias is not None:
            _copy(new.bias, bias)
        return new

    def rms_norm(offset: float) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            new = nn.RMSNorm(shape, eps=eps, dtype=dtype, device=weight.device)
            _copy(new.weight, weight.double() + offset)
            return new

        return build

    found: list[_Candidate] = [("LayerNorm", layer_norm, last_probes)]
    if bias is None:
        found += [("RMSNorm", rms_norm(0.0), last_probes), ("RMSNorm(1 + weight)", rms_norm(1.0), last_probes)]
    groups = next((getattr(module, n) for n in _GROUP_NAMES if type(getattr(module, n, None)) is int), None)
    if groups is not None and len(shape) == 1 and groups > 0 and shape[0] % groups == 0:
        channels = shape[0]

        def group_norm() -> nn.Module:
            new = nn.GroupNorm(groups, channels, eps=eps, affine=True, dtype=dtype, device=weight.device)
            _copy(new.weight, weight)
            if bias is not None:
                _copy(new.bias, bias)
            else:
                nn.init.zeros_(new.bias)
            return new

        found.insert(0, ("GroupNorm", group_norm, [(2, channels, 3, 4), (1, channels, 5, 2)]))
    return found


def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(source.to(target.dtype))


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.GroupNorm):
        return f"GroupNorm({module.num_groups}, {module.num_channels}, eps={module.eps!r})"
    shape = tuple(module.normalized_shape)
    return f"{type(module).__name__}({list(shape)}, eps={module.eps!r})"
