"""The TLC loop on a torch module: score, pick, linearize, fine-tune, merge, until a stop.

Each step:

1. Every remaining activation site is a candidate unless :func:`.graph.refusal` refuses it.
   Its channel plan comes from the BatchNorm feeding it (``score="bn"``) or from calibration
   statistics (``score="empirical"``, and always for sites with no BatchNorm directly before
   them: decision (a) in :mod:`.graph`). The candidate model is the current one with that site
   linearized and, when the next conv is padded and ``pad_first`` is on, its padding moved to
   the head of the conv chain (kept only if that conv then merges).
2. The merge engine (:mod:`.rewrite`) runs on the candidate; a candidate that neither merges a
   layer nor lowers the MACs (all its merges refused, e.g. for growing the MACs) is refused with
   the engine's reason.
3. Ranking. ``rank="probe"`` (the paper's): the calibration loss of every candidate model, on
   the same probe batches. Decision (b): one site per step, then fine-tune and re-score. The
   paper's code removes several sites at once when several single removals lower the loss, and
   measured here those gaps are within one-batch noise, so normfold does not trust them: a
   candidate whose paired per-batch loss difference to the best one is within one standard error
   of it ties with the best, and among ties the one leaving the fewest MACs wins (selection is
   cost-aware: two merged 3×3 convs are a 5×5 conv, and the big wins are whole suffixes that
   become linear). ``rank="score"`` ranks by the data-free mean channel score instead, and a
   callable ``rank(model, sites) -> site`` picks one of the candidate site names itself (the
   benchmark's random and entropy orders).
4. The chosen model is fine-tuned through ``finetune(model, step)`` (training mode; torch's
   global generator is seeded with ``seed`` and the step first, so runs repeat), merged, and
   evaluated through ``evaluate(merged) -> float`` (higher is better).
5. Stop when accuracy falls more than ``max_accuracy_drop`` below the dense model's (that step
   is undone and reported as such), when ``target_depth`` activation sites remain, when the
   merged model's batch-1 latency reaches ``target_latency_ms``, after ``max_steps``, or when no
   candidate is left.

With ``checkpoint_dir``, the state after each step is saved there (``collapse.pt``: the removed
sites, their plans, the state dict and the report rows, all plain tensors, lists and strings)
and a rerun with the same arguments resumes after the last saved step; it is read with
``torch.load(..., weights_only=True)``, which never unpickles code.
"""

from __future__ import annotations

__all__ = ["collapse", "trace"]

import copy
import dataclasses
import json
import math
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from tqdm import tqdm

from normfold.math.collapse_scores import ChannelPlan, channel_plan, layer_score
from normfold.errors import InputError, first_line
from normfold.torch.layer_collapse import calibrate, cost
from normfold.torch.layer_collapse.graph import (
    activation_of,
    batchnorm_before,
    channel_axis,
    describe,
    is_conv,
    module_of,
    readers_of,
    refusal,
    sites,
    why_no_merge,
)
from normfold.torch.layer_collapse.graph import (
    pad_first as move_padding,
)
from normfold.torch.layer_collapse.linearize import ChannelAffine, linearize_site
from normfold.torch.layer_collapse.report import CollapseResult, CollapseStep
from normfold.torch.layer_collapse.rewrite import (
    MergeResult,
    layer_count,
    merge_layers,
    record_shapes,
    shape_of,
)

_CHECKPOINT = "collapse.pt"
_FORMAT = 1


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, ChannelAffine) or super().is_leaf_module(m, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` as a torch.fx GraphModule in eval mode (InputError when fx cannot trace it)."""
    model = copy.deepcopy(model).eval()
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many types for untraceable code
        raise InputError(
            f"collapse needs a model torch.fx can trace: {type(error).__name__}: {first_line(error)}"
        ) from None
    return fx.GraphModule(model, graph, type(model).__name__)


@dataclasses.dataclass
class _Candidate:
    site: str
    kind: str
    mode: str
    plan: ChannelPlan
    model: fx.GraphModule
    merged: MergeResult
    pad_first: bool
    macs: int
    losses: np.ndarray | None = None


class _Run:
    """One collapse run's settings and state."""

    def __init__(
        self, model: nn.Module, calibration: Iterable[Any], settings: dict[str, Any], loss_fn: calibrate.LossFn | None
    ) -> None:
        self.s = settings
        self.loss_fn = loss_fn
        self.inputs: tuple[torch.Tensor, ...] = settings["example_inputs"]
        self.batches, self.probe = calibrate.make_batches(calibration, settings["probe_samples"])
        self.dense = trace(model)
        self.like = next((p for p in self.dense.parameters() if p.is_floating_point()), torch.zeros(()))
        self.references = None
        if any(b.target is None for b in self.probe):
            with torch.no_grad():
                self.references = [self.dense(*b.inputs) for b in self.probe]

    def merge(self, gm: fx.GraphModule, *, verify: bool = True) -> MergeResult:
        return merge_layers(gm, self.inputs, max_flops_growth=self.s["max_flops_growth"],
                            allow_border=not self.s["pad_first"], verify=verify)

    def latency(self, module: nn.Module) -> float | None:
        return cost.latency_ms(module, self.inputs) if self.s["measure_latency"] else None

    # -- candidates ---------------------------------------------------------------------------
    def candidates(
        self, working: fx.GraphModule, current: MergeResult
    ) -> tuple[list[_Candidate], list[dict[str, str]]]:
        record_shapes(working, self.inputs)
        remaining = sites(working)
        need_stats = {}
        for node in remaining:
            if self.s["score"] == "empirical" or batchnorm_before(working, node) is None:
                need_stats[node.name] = channel_axis(working, node, len(shape_of(node.args[0])))
        stats = calibrate.activation_statistics(working, self.batches, need_stats) if need_stats else {}
        self.current_macs = cost.macs(current.module, self.inputs)
        found, refused = [], []
        for node in remaining:
            reason = refusal(working, node)
            if reason is None:
                candidate, reason = self._candidate(working, node.name, stats, current)
                if candidate is not None:
                    found.append(candidate)
                    continue
            refused.append({"node": node.name, "reason": reason})
        return found, refused

    def _plan(self, working: fx.GraphModule, node: fx.Node, stats: dict) -> tuple[str, ChannelPlan, int]:
        activation = activation_of(working, node)
        axis = channel_axis(working, node, len(shape_of(node.args[0])))
        bn = batchnorm_before(working, node)
        if node.name not in stats and bn is not None:
            channels = bn.running_mean.numel()
            beta = bn.bias.detach().double().cpu().numpy() if bn.bias is not None else np.zeros(channels)
            gamma = bn.weight.detach().double().cpu().numpy() if bn.weight is not None else np.ones(channels)
            plan = channel_plan(activation.kind, beta, gamma, negative_slope=activation.negative_slope,
                                upper=activation.upper)
            return "bn", plan, axis
        mean, std, output_mean = stats[node.name]
        plan = channel_plan(activation.kind, mean, std, negative_slope=activation.negative_slope,
                            upper=activation.upper, output_mean=output_mean)
        return "empirical", plan, axis

    def _candidate(
        self, working: fx.GraphModule, name: str, stats: dict, current: MergeResult
    ) -> tuple[_Candidate | None, str]:
        gm, plan, mode, moved_to = self._linearized(working, name, stats, pad_first=self.s["pad_first"])
        merged = self.merge(gm, verify=False)
        first_reason = None
        if moved_to is not None and not any(m.kind == "conv-conv" and m.into == moved_to for m in merged.merges):
            # Pad-first only pays when the padded conv then merges; keep the original borders.
            first_reason = _new_refusal(merged, current)
            gm, plan, mode, moved_to = self._linearized(working, name, stats, pad_first=False)
            merged = self.merge(gm, verify=False)
        macs = cost.macs(merged.module, self.inputs)
        # A candidate must buy depth or work: fewer layers, or the same layers doing less.
        if layer_count(merged.module) >= layer_count(current.module) and macs >= self.current_macs:
            node = next(n for n in gm.graph.nodes if n.name == name)
            return None, first_reason or _new_refusal(merged, current) or why_no_merge(gm, node)
        kind = activation_of(working, next(n for n in working.graph.nodes if n.name == name)).kind
        return _Candidate(name, kind, mode, plan, gm, merged, moved_to is not None, macs), ""

    def _linearized(
        self, working: fx.GraphModule, name: str, stats: dict, *, pad_first: bool
    ) -> tuple[fx.GraphModule, ChannelPlan, str, str | None]:
        """A copy of ``working`` with site ``name`` linearized (and the next conv's padding moved)."""
        gm = copy.deepcopy(working)
        node = next(n for n in gm.graph.nodes if n.name == name)
        mode, plan, axis = self._plan(gm, node, stats)
        linearize_site(gm, name, plan, axis, source=describe(gm, node), like=self.like)
        node = next(n for n in gm.graph.nodes if n.name == name)
        readers = readers_of(gm, node)
        if pad_first and len(readers) == 1 and is_conv(gm, readers[0]) and any(_padding(module_of(gm, readers[0]))):
            if move_padding(gm, readers[0]) is None:
                return gm, plan, mode, readers[0].name
        return gm, plan, mode, None

    def choose(self, working: fx.GraphModule, found: list[_Candidate]) -> _Candidate:
        if callable(self.s["rank"]):
            chosen = self.s["rank"](working, [c.site for c in found])
            return next(c for c in found if c.site == chosen)
        if self.s["rank"] == "score":
            return min(found, key=lambda c: (layer_score(c.plan), c.macs))
        base = calibrate.probe_losses(working, self.probe, self.loss_fn, self.references)
        for candidate in found:
            candidate.losses = calibrate.probe_losses(candidate.model, self.probe, self.loss_fn, self.references) - base
        best = min(found, key=lambda c: float(c.losses.mean()))
        tied = [c for c in found if _within_noise(c.losses - best.losses)]
        return min(tied, key=lambda c: (c.macs, float(c.losses.mean())))


def _within_noise(difference: np.ndarray) -> bool:
    """Whether a paired loss difference is within one standard error of zero (or below it)."""
    if difference.size < 2:
        return float(difference.mean()) <= 0.0
    return float(difference.mean()) <= float(difference.std(ddof=1)) / math.sqrt(difference.size)


def _new_refusal(merged: MergeResult, current: MergeResult) -> str | None:
    """The first merge refusal of a candidate that the current model does not have."""
    return next((r for node, r in merged.refused.items() if node not in current.refused), None)


def _padding(module: nn.Module) -> tuple[int, ...]:
    return (0,) if isinstance(module.padding, str) else tuple(module.padding)


def collapse(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    evaluate: Callable[[nn.Module], float],
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    finetune: Callable[[nn.Module, int], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    max_accuracy_drop: float = 0.01,
    score: str = "bn",
    rank: str | Callable[[fx.GraphModule, list[str]], str] = "probe",
    max_flops_growth: float = 1.0,
    pad_first: bool = True,
    target_depth: int | None = None,
    target_latency_ms: float | None = None,
    max_steps: int | None = None,
    probe_samples: int | None = 512,
    checkpoint_dir: str | os.PathLike | None = None,
    seed: int = 0,
    measure_latency: bool = True,
    keep_models: bool = True,
    progress: bool = True,
) -> CollapseResult:
    """Collapse ``model`` (not modified) step by step; see the module docstring for the loop.

    ``calibration``: input batches or ``(input, target)`` pairs. ``evaluate(model) -> float``,
    higher is better. ``finetune(model, step)``: train the linearized model in place (optional).
    ``example_inputs``: a batch the merges are verified on (and the first sample is timed).
    ``target_depth``: stop when this many activation sites remain.
    """
    if score not in ("bn", "empirical"):
        raise InputError(f"score must be 'bn' or 'empirical', not {score!r}")
    if not callable(rank) and rank not in ("probe", "score"):
        raise InputError(f"rank must be 'probe', 'score' or a callable, not {rank!r}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    settings = dict(
        example_inputs=inputs, max_accuracy_drop=max_accuracy_drop, score=score, rank=rank,
        max_flops_growth=max_flops_growth, pad_first=pad_first, probe_samples=probe_samples,
        measure_latency=measure_latency, seed=seed,
    )
    run = _Run(model, calibration, settings, loss_fn)
    checkpoint = Path(checkpoint_dir) / _CHECKPOINT if checkpoint_dir is not None else None

    dense_merged = run.merge(run.dense)
    if checkpoint is not None and checkpoint.exists():
        working, removed, history, dense_row = _resume(run, checkpoint)
    else:
        working, removed, history = copy.deepcopy(run.dense), [], []
        dense_row = {
            "accuracy": float(evaluate(run.dense)),
            "params": cost.parameters(run.dense),
            "macs": cost.macs(run.dense, inputs),
            "macs_merged": cost.macs(dense_merged.module, inputs),
            "latency_ms": run.latency(run.dense),
            "latency_ms_merged": run.latency(dense_merged.module),
            "activations": len(sites(run.dense)),
            "layers": layer_count(run.dense),
            "layers_after_bn_fold": layer_count(dense_merged.module),
        }
    current = run.merge(working) if removed else dense_merged
    floor = dense_row["accuracy"] - max_accuracy_drop
    bar = tqdm(total=dense_row["activations"], initial=len(removed), desc="collapse", unit="site",
               disable=None if progress else True, leave=False)
    stopped = "max_steps reached"
    while max_steps is None or len([h for h in history if h.accepted]) < max_steps:
        if target_depth is not None and len(sites(working)) <= target_depth:
            stopped = "target depth reached"
            break
        bar.set_description_str(f"collapse step {len(history) + 1}: candidates")
        found, refused = run.candidates(working, current)
        if not found:
            stopped = "nothing left to remove"
            break
        bar.set_description_str(f"collapse step {len(history) + 1}: probe {len(found)}")
        chosen = run.choose(working, found)
        model_step = chosen.model
        if finetune is not None:
            bar.set_description_str(f"collapse step {len(history) + 1}: fine-tune")
            _seed(seed, len(history) + 1)
            model_step.train()
            finetune(model_step, len(history) + 1)
            model_step.eval()
        merged = run.merge(model_step)
        accuracy = float(evaluate(merged.module))
        accepted = accuracy >= floor
        step = CollapseStep(
            step=len(history) + 1, site=chosen.site, kind=chosen.kind, mode=chosen.mode,
            score=layer_score(chosen.plan), channels=chosen.plan.to_dict(),
            probe_loss=None if chosen.losses is None else float(chosen.losses.mean()),
            pad_first=chosen.pad_first, accuracy=accuracy, accepted=accepted,
            activations_removed=len(removed) + 1,
            layers_merged=dense_row["layers"] - layer_count(merged.module),
            params=cost.parameters(merged.module), macs=cost.macs(merged.module, inputs),
            macs_unmerged=cost.macs(model_step, inputs), latency_ms=run.latency(merged.module),
            latency_ms_unmerged=run.latency(model_step),
            merges=[m.to_dict() for m in merged.merges], refused=refused,
            model=merged.module if keep_models else None,
        )
        history.append(step)
        if not accepted:
            stopped = (f"accuracy {accuracy:.4f} fell below {floor:.4f} "
                       f"(max_accuracy_drop {max_accuracy_drop:g}); step undone")
            break
        working, current = model_step, merged
        removed.append({"site": chosen.site, "slope": torch.from_numpy(chosen.plan.slope),
                        "offset": torch.from_numpy(chosen.plan.offset),
                        "axis": int(module_of(working, _node(working, chosen.site)).axis),
                        "pad_first": _padded_reader(working, chosen.site) if chosen.pad_first else ""})
        bar.update(1)
        bar.set_postfix_str(f"acc {accuracy:.4f}, layers -{step.layers_merged}")
        if checkpoint is not None:
            _save(checkpoint, working, removed, history, dense_row)
        if target_latency_ms is not None and step.latency_ms is not None and step.latency_ms <= target_latency_ms:
            stopped = "target latency reached"
            break
    bar.close()
    report = {
        "dense": dense_row,
        "steps": [h.to_dict() for h in history],
        "stopped": stopped,
        "settings": {k: v if not callable(v) else getattr(v, "__name__", "callable")
                     for k, v in settings.items() if k != "example_inputs"},
    }
    return CollapseResult(model=current.module.eval(), report=report, history=history)


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _padded_reader(gm: fx.GraphModule, site: str) -> str:
    readers = readers_of(gm, _node(gm, site))
    return readers[0].name if readers else ""


def _seed(seed: int, step: int) -> None:
    value = seed * 1_000_003 + step
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


def _save(path: Path, working: fx.GraphModule, removed: list[dict], history: list[CollapseStep], dense: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": _FORMAT,
        "removed": removed,
        "state_dict": working.state_dict(),
        "history": json.dumps([h.to_dict() for h in history if h.accepted]),
        "dense": json.dumps(dense),
    }
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _resume(run: _Run, path: Path) -> tuple[fx.GraphModule, list[dict], list[CollapseStep], dict]:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ...
        raise InputError(f"{path}: not a collapse checkpoint that loads safely: {first_line(error)}") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise InputError(f"{path}: not a normfold collapse checkpoint (format {_FORMAT})")
    working = copy.deepcopy(run.dense)
    record_shapes(working, run.inputs)
    for entry in state["removed"]:
        names = {n.name for n in sites(working)}
        if entry["site"] not in names:
            raise InputError(
                f"{path}: site {entry['site']!r} is not in this model: the checkpoint is for another model"
            )
        slope, offset = entry["slope"].double().numpy(), entry["offset"].double().numpy()
        plan = ChannelPlan(slope, offset, np.zeros_like(slope), slope == 1.0)
        node = _node(working, entry["site"])
        linearize_site(working, entry["site"], plan, entry["axis"], source=describe(working, node), like=run.like)
        if entry["pad_first"]:
            move_padding(working, _node(working, entry["pad_first"]))
    working.load_state_dict(state["state_dict"])
    history = [CollapseStep.from_dict(row) for row in json.loads(state["history"])]
    return working.eval(), list(state["removed"]), history, json.loads(state["dense"])
