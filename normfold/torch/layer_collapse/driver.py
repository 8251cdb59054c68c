"""The TLC loop on a torch module: find candidates, choose, linearize, fine-tune, merge, until a stop.

Each step:

1. **Candidates.** A candidate removes a run of up to ``max_segment_sites`` consecutive activation
   sites (graph order) that :func:`.graph.refusal` allows and that lie in one segment once removed
   (:mod:`.segments`): a single site, both activations of an inverted residual (pw→dw→pw, plus its
   residual, becomes one dense conv), a residual block's inner activation (conv∘conv plus its
   identity or 1×1 shortcut becomes one conv), an after-Add activation together with the next
   block's. Each site's channel plan comes from the BatchNorm feeding it (``score="bn"``) or from
   calibration statistics (``score="empirical"``, and always for sites with no BatchNorm directly
   before them: decision (a) in :mod:`.graph`). When a removed site's reader conv is padded and
   ``pad_first`` is on, its padding moves to the head of the conv chain (kept only if that conv
   then merges), across a residual block too (the shortcut lands on the merged kernel's centre).
   With ``prune`` on, dropping a residual branch is a candidate too (LayerMerge's conv pruning):
   ``x + branch(x)`` becomes ``x + c`` (``c`` the branch's per-channel mean on the calibration
   set), and every site inside the branch goes with it.
2. **Final-form cost.** A candidate's segment is merged as it is now and as it would be after
   the removal; it is kept only if it loses layers or MACs, and then only if its final merged
   form costs at most ``max_flops_growth`` times the segment now (MAC selection), or, when
   selecting by latency, if the final form's measured batch-1 onnxruntime latency is lower
   (segments are timed in a cache keyed by structure and shapes, :class:`normfold.latency.LatencyTable`:
   median of ``latency_repeats`` rounds, each the median of ``latency_runs`` runs; the
   inter-quartile range is recorded). Merges inside an accepted segment may grow on the way.
3. **Choice.** Without ``target_latency``, one candidate per step: ``rank="probe"`` (the
   paper's) compares the calibration loss of every candidate model on the same probe batches;
   candidates whose paired per-batch loss difference to the best is within one standard error
   tie with it, and among ties the one leaving the fewest MACs wins (decision (b)).
   ``rank="score"`` ranks by the data-free mean channel score, and a callable
   ``rank(model, labels) -> label`` picks a candidate by its label (sites joined by ``+``; the
   benchmark's random and entropy orders). With ``target_latency`` (a ratio to the BN-folded
   dense model's latency; MACs when ``measure_latency`` is off), the removals are chosen
   *jointly*: the dynamic program of :mod:`normfold.math.collapse_select` (Kim et al., ICML 2023)
   picks the non-touching runs that save what the budget still needs with the least summed probe
   loss. A pruned branch is offered to it only where it saves measurably more than every exact
   merge of the same block (more than the larger timing IQR of the two savings,
   :func:`normfold.math.collapse_select.prefer_exact`): the probe judges both before fine-tuning,
   when the merged block still has all its weights to recover with and the pruned one none, so
   a near-tie in time goes to the exact merge (withdrawn prunings are listed with the step's
   refusals). Measuring latency, that choice is then fitted on the whole model (:meth:`_Run.fit`:
   widened when it misses the budget, trimmed by decreasing loss while it still meets it), since
   segment savings add up to the model's only roughly. A step applies the choice, or the
   ``removals_per_step`` with the least loss. When a joint step falls below the accuracy floor
   it is undone and its less lossy half is tried.
4. The chosen model is fine-tuned through ``finetune(model, step)`` (training mode; torch's
   global generator is seeded with ``seed`` and the step first, so runs repeat); a callback with
   a ``teacher`` parameter also receives the dense model (eval mode) to distil from. It is then
   merged (every merge checked in float64 against the unmerged model) and evaluated through
   ``evaluate(merged) -> float`` (higher is better). A step below the accuracy floor is
   fine-tuned again, up to ``recovery_rounds`` more times while each round raises its accuracy,
   before it counts as fallen: a large joint step is far from its recovered accuracy after one
   short fine-tune.
5. Stop when accuracy falls more than ``max_accuracy_drop`` below the dense model's (that step
   is undone and reported as such; when ``evaluate`` returns per-sample scores, the accuracy is
   their mean and a step must clear the floor by one standard error of its paired difference to
   the dense model's scores, :mod:`normfold.math.paired_accuracy`, since on a small evaluation
   set that error is as large as the drop allowed), when ``target_depth`` activation sites remain, when the
   merged model reaches ``target_latency`` or ``target_latency_ms``, after ``max_steps``, or
   when no candidate is left.

With ``checkpoint_dir``, the state after each step is saved there (``collapse.pt``: the edits
made — sites linearized with their plans, paddings moved, branches pruned —, the state dict and
the report rows, all plain tensors, lists and strings) and a rerun with the same arguments
resumes after the last saved step; it is read with ``torch.load(..., weights_only=True)``, which
never unpickles code.
"""

from __future__ import annotations

__all__ = ["collapse", "trace"]

import copy
import dataclasses
import inspect
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

from normfold.errors import InputError, first_line
from normfold.latency import LatencyTable, Timing
from normfold.math.collapse_scores import ChannelPlan, channel_plan, layer_score
from normfold.math.collapse_select import Option, choose, prefer_exact, quantize
from normfold.math.padding import torch_conv_pads
from normfold.math.paired_accuracy import paired_standard_error
from normfold.torch.layer_collapse import calibrate, cost, segments
from normfold.torch.layer_collapse.graph import (
    activation_of,
    batchnorm_before,
    channel_axis,
    describe,
    is_add,
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
from normfold.torch.layer_collapse.report import Collapsed, CollapseResult, CollapseStep
from normfold.torch.layer_collapse.rewrite import (
    MergeResult,
    layer_count,
    merge_layers,
    record_shapes,
    shape_of,
)

_CHECKPOINT = "collapse.pt"
_FORMAT = 2
# Latency savings are quantized for the dynamic program in this fraction of what is needed.
_RESOLUTION = 200


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, ChannelAffine) or super().is_leaf_module(m, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` as a torch.fx GraphModule in eval mode (InputError when fx cannot trace it)."""
    model = copy.deepcopy(model).eval()
    if isinstance(model, Collapsed):
        model = model.graph_module
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
    """One removal: its sites, the edits that make it, the model with them, its segment's cost."""

    sites: tuple[str, ...]
    kinds: tuple[str, ...]
    modes: tuple[str, ...]
    plans: tuple[ChannelPlan, ...]
    edits: list[dict[str, Any]]
    model: fx.GraphModule
    segment: segments.Segment
    macs: int
    losses: np.ndarray | None = None

    @property
    def label(self) -> str:
        return "+".join(self.sites) if self.kinds != ("prune",) else f"prune {self.edits[0]['add']}"

    @property
    def pruned(self) -> bool:
        return self.kinds == ("prune",)


class _Run:
    """One collapse run's settings and state."""

    def __init__(
        self, model: nn.Module, calibration: Iterable[Any], settings: dict[str, Any], loss_fn: calibrate.LossFn | None
    ) -> None:
        self.s = settings
        self.loss_fn = loss_fn
        self.inputs: tuple[torch.Tensor, ...] = settings["example_inputs"]
        self.single = tuple(x[:1] for x in self.inputs)
        self.batches, self.probe = calibrate.make_batches(calibration, settings["probe_samples"])
        self.dense = trace(model)
        self.like = next((p for p in self.dense.parameters() if p.is_floating_point()), torch.zeros(()))
        self.references = None
        if any(b.target is None for b in self.probe):
            with torch.no_grad():
                self.references = [self.dense(*b.inputs) for b in self.probe]
        self.table = LatencyTable(runs=settings["latency_runs"], repeats=settings["latency_repeats"])
        self.withdrawn: list[dict[str, str]] = []  # prunings the last selection withdrew for merges
        self.free: set[str] = set()  # nodes of accepted segments: their merges are judged as a whole
        self.dense_merged: nn.Module = self.dense  # the BN-folded dense model, set by collapse()

    def merge(self, gm: fx.GraphModule, *, verify: bool = True, free: Iterable[str] = ()) -> MergeResult:
        return merge_layers(gm, self.inputs, max_flops_growth=self.s["max_flops_growth"],
                            allow_border=not self.s["pad_first"], verify=verify, free=self.free | set(free))

    def latency(self, module: nn.Module) -> Timing | None:
        """Batch-1 onnxruntime latency of a whole model (None when measuring is off)."""
        if not self.s["measure_latency"]:
            return None
        return cost.ort_latency(module, self.single, runs=self.s["latency_runs"],
                                repeats=self.s["latency_repeats"])

    def against_dense(self, module: nn.Module) -> tuple[Timing, Timing] | None:
        """A whole model's latency, and its ratio to the BN-folded dense model's per round.

        The two are timed round for round in turn, so both see the same load: on a shared
        machine two timings of one model minutes apart differed by 10%, more than a budget's
        margin, so the budget is judged on this ratio, never against a dense timing taken earlier.
        """
        if not self.s["measure_latency"]:
            return None
        timing, dense = cost.ort_latencies([module, self.dense_merged], self.single, runs=self.s["latency_runs"],
                                           repeats=self.s["latency_repeats"])
        return timing, Timing(tuple(t / d for t, d in zip(timing.rounds, dense.rounds)))

    # -- candidates ---------------------------------------------------------------------------
    def candidates(self, working: fx.GraphModule) -> tuple[list[_Candidate], list[dict[str, str]]]:
        record_shapes(working, self.single)
        remaining = sites(working)
        need_stats = {}
        for node in remaining:
            if self.s["score"] == "empirical" or batchnorm_before(working, node) is None:
                need_stats[node.name] = channel_axis(working, node, len(shape_of(node.args[0])))
        stats = calibrate.activation_statistics(working, self.batches, need_stats) if need_stats else {}
        record_shapes(working, self.single)
        found: list[_Candidate] = []
        refused: list[dict[str, str]] = []
        allowed: list[bool] = []
        for node in remaining:
            reason = refusal(working, node)
            allowed.append(reason is None)
            if reason is not None:
                refused.append({"node": node.name, "reason": reason})
        names = [n.name for n in remaining]
        for start in range(len(names)):
            for stop in range(start + 1, min(len(names), start + self.s["max_segment_sites"]) + 1):
                if not all(allowed[start:stop]):
                    break
                run = tuple(names[start:stop])
                if stop - start > 1 and not _connected(working, run):
                    continue
                candidate, reason = self._candidate(working, run, stats)
                if candidate is not None:
                    found.append(candidate)
                elif stop - start == 1:
                    refused.append({"node": run[0], "reason": reason})
        if self.s["prune"]:
            found.extend(self._prunings(working, set(names)))
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
        self, working: fx.GraphModule, run: tuple[str, ...], stats: dict
    ) -> tuple[_Candidate | None, str]:
        nodes = [_node(working, name) for name in run]
        kinds = tuple(activation_of(working, n).kind for n in nodes)
        planned = [self._plan(working, n, stats) for n in nodes]
        edits = [{"op": "linearize", "site": name, "slope": torch.from_numpy(plan.slope),
                  "offset": torch.from_numpy(plan.offset), "axis": axis}
                 for name, (_, plan, axis) in zip(run, planned)]
        names = [n.name for n in segments.segment(working, run)]
        before, _ = self._form(working, names, free=())
        moved = self._padded_readers(working, run) if self.s["pad_first"] else []
        gm = _edited(working, edits + [{"op": "pad_first", "conv": c} for c in moved], self.like)
        after, merged = self._form(gm, names, free=names)
        if moved and not all(any(m.kind == "conv-conv" and m.into == c for m in merged.merges) for c in moved):
            # Pad-first only pays when the padded conv then merges; keep the original borders.
            moved = []
            gm = _edited(working, edits, self.like)
            after, merged = self._form(gm, names, free=names)
        segment = segments.Segment(names, before, after)
        reason = self._judge(segment, gm, run, merged)
        if reason:
            return None, reason
        macs = self.current_macs - before.macs + after.macs
        edits += [{"op": "pad_first", "conv": c} for c in moved]
        return _Candidate(run, kinds, tuple(m for m, _, _ in planned), tuple(p for _, p, _ in planned), edits, gm,
                          segment, macs), ""

    def _judge(
        self, segment: segments.Segment, gm: fx.GraphModule, run: tuple[str, ...], merged: MergeResult
    ) -> str | None:
        """Why a candidate's final merged form is not worth it, or None when it is."""
        if not segment.shrinks:
            return next(iter(merged.refused.values()), None) or why_no_merge(gm, _node(gm, run[0]))
        before, after = segment.before, segment.after
        if self.s["by_latency"] and segment.saving_ms is not None:
            if segment.saving_ms <= 0:
                return (f"its segment merged into {after.layers} layer(s) runs no faster "
                        f"({before.latency.median:.4f} -> {after.latency.median:.4f} ms measured)")
        elif segment.growth > self.s["max_flops_growth"]:
            return (f"its segment's final merged form would grow the work x{segment.growth:.2f} "
                    f"({before.macs} -> {after.macs} MACs) > max_flops_growth {self.s['max_flops_growth']:g}")
        return None

    def _form(
        self, gm: fx.GraphModule, names: list[str], *, free: Iterable[str]
    ) -> tuple[segments.Form, MergeResult]:
        """Segment ``names`` of ``gm`` merged (planning: no weights), counted and timed."""
        sub, inputs = segments.extract(gm, names)
        merged = merge_layers(sub, inputs, max_flops_growth=self.s["max_flops_growth"],
                              allow_border=not self.s["pad_first"], verify=False, weights=False,
                              free=self.free | set(free))
        timing = segments.timing(self.table, merged.module, inputs) if self.s["by_latency"] else None
        return segments.Form(layer_count(merged.module), cost.macs(merged.module, inputs), timing), merged

    def _padded_readers(self, working: fx.GraphModule, run: tuple[str, ...]) -> list[str]:
        moved = []
        for name in run:
            readers = readers_of(working, _node(working, name))
            if len(readers) == 1 and is_conv(working, readers[0]) and _padded(module_of(working, readers[0])):
                moved.append(readers[0].name)
        return moved

    def _prunings(self, working: fx.GraphModule, remaining: set[str]) -> list[_Candidate]:
        """Residual branches that can be dropped whole: ``x + branch(x)`` becomes ``x + c``."""
        found, wanted = [], {}
        for add in [n for n in working.graph.nodes if is_add(n)]:
            for branch, shortcut in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
                inside = _exclusive(branch, add)
                run = tuple(n.name for n in working.graph.nodes if n in inside and n.name in remaining)
                if run and shape_of(shortcut) == shape_of(add):
                    wanted[add.name] = (branch, shortcut, inside, run)
                    break
        if not wanted:
            return found
        means = calibrate.output_means(working, self.batches, {b.name for b, _, _, _ in wanted.values()})
        for add_name, (branch, shortcut, inside, run) in wanted.items():
            edits = [{"op": "prune", "add": add_name, "keep": shortcut.name,
                      "offset": torch.from_numpy(means[branch.name])}]
            gm = _edited(working, edits, self.like)
            names = [n.name for n in working.graph.nodes if n in inside] + [add_name]
            segment = segments.Segment(names, self._form(working, names, free=())[0],
                                       self._form(gm, [add_name], free=())[0])
            if self.s["by_latency"] and segment.saving_ms is not None and segment.saving_ms <= 0:
                continue
            macs = self.current_macs - segment.before.macs + segment.after.macs
            found.append(_Candidate(run, ("prune",), ("mean",), (), edits, gm, segment, macs))
        return found

    # -- choosing -------------------------------------------------------------------------------
    def measure_losses(self, working: fx.GraphModule, found: list[_Candidate]) -> None:
        base = calibrate.probe_losses(working, self.probe, self.loss_fn, self.references)
        for candidate in found:
            candidate.losses = calibrate.probe_losses(candidate.model, self.probe, self.loss_fn, self.references) - base

    def choose(self, working: fx.GraphModule, found: list[_Candidate]) -> _Candidate:
        if callable(self.s["rank"]):
            chosen = self.s["rank"](working, [c.label for c in found])
            return next(c for c in found if c.label == chosen)
        if self.s["rank"] == "score":
            return min(found, key=lambda c: (np.mean([layer_score(p) for p in c.plans]) if c.plans else 1.0, c.macs))
        self.measure_losses(working, found)
        best = min(found, key=lambda c: float(c.losses.mean()))
        tied = [c for c in found if _within_noise(c.losses - best.losses)]
        return min(tied, key=lambda c: (c.macs, float(c.losses.mean())))

    def select(self, working: fx.GraphModule, found: list[_Candidate], need: float) -> list[_Candidate]:
        """The candidates the segment DP chooses jointly to save ``need`` (ms, or MACs)."""
        if any(c.losses is None for c in found):
            self.measure_losses(working, found)
        remaining = sites(working)
        order = {node.name: index for index, node in enumerate(remaining)}
        savings = [c.segment.saving_ms if self.s["by_latency"] else c.segment.before.macs - c.segment.after.macs
                   for c in found]
        unit = need / _RESOLUTION
        options = [
            Option(order[c.sites[0]], order[c.sites[-1]] + 1, saving, float(c.losses.mean()), c.label,
                   exact=not c.pruned, spread=math.ceil(_spread_ms(c.segment) / unit))
            for c, saving in zip(found, quantize(savings, unit))
            if [order[s] for s in c.sites] == list(range(order[c.sites[0]], order[c.sites[-1]] + 1))
        ]
        # A pruned branch is offered only where it measurably saves more than merging the block.
        options, withdrawn = prefer_exact(options)
        by_label = {c.label: c for c in found}
        self.withdrawn = [
            {"node": label, "reason": f"withdrawn: the exact merge {rival.label} of the same block saves as "
                                      f"much, within noise ({self._saving(by_label[label])} against "
                                      f"{self._saving(by_label[rival.label])})"}
            for label, rival in withdrawn.items()
        ]
        separate = [b for b in range(1, len(remaining)) if _separate(working, remaining[b - 1], remaining[b])]
        selection = choose(options, len(order), math.ceil(need / unit), separate)
        chosen = sorted((by_label[o.label] for o in selection.options), key=lambda c: float(c.losses.mean()))
        return chosen[: self.s["removals_per_step"]] if self.s["removals_per_step"] else chosen

    def _saving(self, candidate: _Candidate) -> str:
        """A candidate's segment saving as the report words it (ms with spread, or MACs)."""
        segment = candidate.segment
        if self.s["by_latency"]:
            return f"{segment.saving_ms:.4f} ms saved, spread {_spread_ms(segment):.4f} ms"
        return f"{segment.before.macs - segment.after.macs} MACs saved"

    def fit(
        self, working: fx.GraphModule, found: list[_Candidate], chosen: list[_Candidate], need: float,
        current: float, target: float, dense_ms: float,
    ) -> tuple[list[_Candidate], list[dict[str, Any]]]:
        """The DP's choice checked on the whole model (merged, before fine-tuning), and fitted to the budget.

        Segment timings add up to the model's saving only roughly (measured on MobileNetV2: six
        removals predicted to just meet a 0.85 budget made the model 0.71x). So the choice is
        applied and the whole model timed in turn with the dense model (:meth:`against_dense`;
        ``current`` and ``target`` are ratios to it, ``need`` and ``dense_ms`` milliseconds).
        When it misses ``target``, the DP runs again
        with ``need`` scaled by predicted/measured saving (at most twice) and the choice
        saving the most is kept. When it meets it, the removals are dropped in order of
        decreasing probe loss while the whole model still meets it (the third quartile of
        its rounds, so that noise does not pass for a fit): no removal costs accuracy that the
        budget does not need. Returns the choice and one row per choice measured.
        """
        trials: list[dict[str, Any]] = []
        timings: dict[tuple[str, ...], Timing] = {}

        def measured(choice: list[_Candidate]) -> Timing:
            key = tuple(sorted(c.label for c in choice))
            if key in timings:
                return timings[key]
            gm = _edited(working, [e for c in choice for e in c.edits], self.like)
            free = {name for c in choice for name in c.segment.nodes}
            timing, ratio = self.against_dense(self.merge(gm, verify=False, free=free).module)
            trials.append({"candidates": [c.label for c in choice],
                           "predicted_saving_ms": sum(c.segment.saving_ms for c in choice),
                           "latency": timing.to_dict(), "ratio": _ratio(ratio)})
            timings[key] = ratio
            return ratio

        timing = measured(chosen)
        for _ in range(2):
            if timing.quartiles[1] <= target:
                break
            predicted = sum(c.segment.saving_ms for c in chosen)
            saved = (current - timing.median) * dense_ms
            if saved <= 0 or predicted <= 0:
                break
            wider = self.select(working, found, need * predicted / saved)
            if [c.label for c in wider] == [c.label for c in chosen]:
                break  # the DP has nothing more to offer
            wider_timing = measured(wider)
            if wider_timing.median >= timing.median:
                break
            chosen, timing = wider, wider_timing
        if timing.quartiles[1] <= target:
            for candidate in sorted(chosen, key=lambda c: float(c.losses.mean()), reverse=True):
                if len(chosen) == 1:
                    break
                trial = [c for c in chosen if c is not candidate]
                if measured(trial).quartiles[1] <= target:
                    chosen = trial
        return chosen, trials


def _connected(gm: fx.GraphModule, run: tuple[str, ...]) -> bool:
    """Whether the sites of ``run``, once linear, lie in one segment."""
    reached = {n.name for n in segments.segment(gm, run, start=run[0])}
    return all(name in reached for name in run)


def _separate(gm: fx.GraphModule, before: fx.Node, site: fx.Node) -> bool:
    """Whether the layers between two consecutive sites cannot merge through each other.

    Walking back from ``site``'s input through single-input linear ops, a value read by more
    than one op (the residual stream between two inverted residuals) or an op with several
    inputs stops any merge across; reaching ``before`` by a single-reader chain does not.
    """
    node = site.args[0] if site.args else None
    while isinstance(node, fx.Node) and node is not before:
        if len(node.users) > 1 or len(node.all_input_nodes) != 1:
            return True
        if not segments.merges_through(gm, node):
            return True
        node = node.all_input_nodes[0]
    return False


def _exclusive(branch: fx.Node, add: fx.Node) -> set[fx.Node]:
    """The nodes computed only for ``add`` through ``branch`` (what dropping the branch removes)."""
    if len(branch.users) != 1:
        return set()

    def only_inside(node: fx.Node, inside: set[fx.Node]) -> bool:
        return node is branch or all(user in inside for user in node.users)

    inside: set[fx.Node] = set()
    stack = [branch]
    while stack:
        node = stack.pop()
        if node in inside or node.op in ("placeholder", "get_attr") or not only_inside(node, inside):
            continue
        inside.add(node)
        stack.extend(node.all_input_nodes)
    return inside


def _spread_ms(segment: segments.Segment) -> float:
    """The noise of a segment's measured saving: the larger IQR of its two timings (0 counting MACs)."""
    if segment.before.latency is None or segment.after.latency is None:
        return 0.0
    return max(segment.before.latency.iqr, segment.after.latency.iqr)


def _within_noise(difference: np.ndarray) -> bool:
    """Whether a paired loss difference is within one standard error of zero (or below it)."""
    if difference.size < 2:
        return float(difference.mean()) <= 0.0
    return float(difference.mean()) <= float(difference.std(ddof=1)) / math.sqrt(difference.size)


def _padded(module: nn.Module) -> bool:
    return any(torch_conv_pads(module.padding, module.kernel_size, module.dilation))


def _edited(working: fx.GraphModule, edits: list[dict[str, Any]], like: torch.Tensor) -> fx.GraphModule:
    """A copy of ``working`` with ``edits`` made (linearize a site, move a padding, prune a branch)."""
    gm = copy.deepcopy(working)
    for edit in edits:
        _apply(gm, edit, like)
    return gm


def _apply(gm: fx.GraphModule, edit: dict[str, Any], like: torch.Tensor) -> None:
    if edit["op"] == "linearize":
        slope, offset = edit["slope"].double().numpy(), edit["offset"].double().numpy()
        plan = ChannelPlan(slope, offset, np.zeros_like(slope), slope == 1.0)
        node = _node(gm, edit["site"])
        linearize_site(gm, edit["site"], plan, edit["axis"], source=describe(gm, node), like=like)
    elif edit["op"] == "pad_first":
        move_padding(gm, _node(gm, edit["conv"]))
    elif edit["op"] == "prune":
        add, keep = _node(gm, edit["add"]), _node(gm, edit["keep"])
        offset = edit["offset"].to(like.dtype)
        name = f"pruned_{add.name}"
        gm.add_submodule(name, ChannelAffine(torch.ones_like(offset), offset, 1, source=f"branch of {add.name}"))
        add.op, add.target, add.args, add.kwargs = "call_module", name, (keep,), {}
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    else:
        raise InputError(f"not a collapse edit: {edit['op']!r}")


def _call_finetune(finetune: Callable[..., None], model: nn.Module, step: int, teacher: nn.Module) -> None:
    """``finetune(model, step)``, with ``teacher=`` the dense model when the callback takes it."""
    parameters = inspect.signature(finetune).parameters
    takes_teacher = "teacher" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if takes_teacher:
        finetune(model, step, teacher=teacher)
    else:
        finetune(model, step)


def collapse(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    evaluate: Callable[[nn.Module], float | np.ndarray],
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    finetune: Callable[..., None] | None = None,
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
    target_latency: float | None = None,
    max_segment_sites: int = 2,
    removals_per_step: int | None = None,
    prune: bool = True,
    latency_runs: int = 50,
    latency_repeats: int = 5,
    recovery_rounds: int = 0,
) -> CollapseResult:
    """Collapse ``model`` (not modified) step by step; see the module docstring for the loop.

    ``calibration``: input batches or ``(input, target)`` pairs. ``evaluate(model) -> float``,
    higher is better, or a 1-D array of per-sample scores (e.g. 1/0 for correct/wrong) whose
    mean is the accuracy: a step is then kept only one paired standard error above the floor. ``finetune(model, step)`` (or ``finetune(model, step, teacher=dense)``):
    train the linearized model in place (optional). ``example_inputs``: a batch the merges are
    verified on (its first sample is timed). ``target_depth``: stop when this many activation
    sites remain. ``target_latency``: the batch-1 onnxruntime latency to reach, as a ratio to the
    BN-folded dense model's (MACs when ``measure_latency`` is off); removals are then chosen
    jointly by the segment DP. ``max_segment_sites``: the longest run of sites one candidate
    removes. ``prune``: also offer dropping whole residual branches. ``recovery_rounds``: how many
    more times a fine-tuned step that falls below the floor is fine-tuned before it is undone
    (each round one more ``finetune`` call; the rounds end at the first that clears the floor or
    does not raise the accuracy).
    """
    if score not in ("bn", "empirical"):
        raise InputError(f"score must be 'bn' or 'empirical', not {score!r}")
    if not callable(rank) and rank not in ("probe", "score"):
        raise InputError(f"rank must be 'probe', 'score' or a callable, not {rank!r}")
    if target_latency is not None and not 0 < target_latency <= 1:
        raise InputError(f"target_latency is a ratio to the dense model's latency in (0, 1], not {target_latency}")
    if recovery_rounds < 0:
        raise InputError(f"recovery_rounds is a count of extra fine-tunes, not {recovery_rounds}")
    if max_segment_sites < 1 or latency_runs < 1 or latency_repeats < 3:
        raise InputError("max_segment_sites and latency_runs must be >= 1, latency_repeats >= 3 (for a spread)")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    settings = dict(
        example_inputs=inputs, max_accuracy_drop=max_accuracy_drop, score=score, rank=rank,
        max_flops_growth=max_flops_growth, pad_first=pad_first, probe_samples=probe_samples,
        measure_latency=measure_latency, seed=seed, target_latency=target_latency,
        max_segment_sites=max_segment_sites, removals_per_step=removals_per_step, prune=prune,
        latency_runs=latency_runs, latency_repeats=latency_repeats, recovery_rounds=recovery_rounds,
        by_latency=target_latency is not None and measure_latency,
    )
    run = _Run(model, calibration, settings, loss_fn)
    checkpoint = Path(checkpoint_dir) / _CHECKPOINT if checkpoint_dir is not None else None

    dense_merged = run.merge(run.dense)
    run.dense_merged = dense_merged.module
    dense_accuracy, dense_scores = _evaluated(evaluate(run.dense))
    if checkpoint is not None and checkpoint.exists():
        working, edits, history, dense_row = _resume(run, checkpoint)
    else:
        working, edits, history = copy.deepcopy(run.dense), [], []
        dense_timing = run.latency(dense_merged.module)
        dense_row = {
            "accuracy": dense_accuracy,
            "params": cost.parameters(run.dense),
            "macs": cost.macs(run.dense, inputs),
            "macs_merged": cost.macs(dense_merged.module, inputs),
            "latency_ms_merged": None if dense_timing is None else dense_timing.median,
            "latency_merged": None if dense_timing is None else dense_timing.to_dict(),
            "activations": len(sites(run.dense)),
            "layers": layer_count(run.dense),
            "layers_after_bn_fold": layer_count(dense_merged.module),
        }
    current = run.merge(working) if edits else dense_merged
    current_cost = _cost(history, dense_row, settings)
    floor = dense_row["accuracy"] - max_accuracy_drop
    bar = tqdm(total=dense_row["activations"], initial=sum(len(h.sites) for h in history if h.accepted),
               desc="collapse", unit="site", disable=None if progress else True, leave=False)
    stopped = "max_steps reached"
    pending: list[_Candidate] = []
    while max_steps is None or len([h for h in history if h.accepted]) < max_steps:
        if target_depth is not None and len(sites(working)) <= target_depth:
            stopped = "target depth reached"
            break
        need = None
        if target_latency is not None:
            # current_cost: a ratio to the dense model measuring latency (need in ms), else MACs.
            if settings["by_latency"]:
                need = (current_cost - target_latency) * dense_row["latency_ms_merged"]
            else:
                need = current_cost - target_latency * dense_row["macs_merged"]
            if need <= 0:
                stopped = "target latency reached"
                break
        number = len(history) + 1
        fit: list[dict[str, Any]] = []
        if pending:
            # The joint choice fell below the floor: try its less lossy half (refusals as before).
            chosen, pending = pending, []
        else:
            bar.set_description_str(f"collapse step {number}: candidates")
            run.current_macs = cost.macs(current.module, inputs)
            found, refused = run.candidates(working)
            if not found:
                stopped = "nothing left to remove"
                break
            bar.set_description_str(f"collapse step {number}: probe {len(found)}")
            if need is None:
                chosen = [run.choose(working, found)]
            else:
                chosen = run.select(working, found, need)
                refused = refused + run.withdrawn
                if settings["by_latency"] and chosen:
                    bar.set_description_str(f"collapse step {number}: fit {len(chosen)} to the budget")
                    chosen, fit = run.fit(working, found, chosen, need, current_cost, target_latency,
                                          dense_row["latency_ms_merged"])
            if not chosen:
                stopped = "no removal saves " + ("latency" if settings["by_latency"] else "MACs")
                break
        step_edits = [e for c in chosen for e in c.edits]
        model_step = chosen[0].model if len(chosen) == 1 else _edited(working, step_edits, run.like)
        free = {name for c in chosen for name in c.segment.nodes}
        rounds, previous = 0, None
        while True:
            if finetune is not None:
                bar.set_description_str(f"collapse step {number}: fine-tune" + (f", round {rounds + 1}" if rounds else ""))
                _seed(seed, number + 1_000 * rounds)  # a recovery round sees its own data order
                model_step.train()
                _call_finetune(finetune, model_step, number, run.dense)
                model_step.eval()
            merged = run.merge(model_step, free=free)
            accuracy, scores = _evaluated(evaluate(merged.module))
            # Per-sample scores: the step must clear the floor by its difference's sampling error.
            margin = 0.0 if scores is None or dense_scores is None else paired_standard_error(scores, dense_scores)
            accepted = accuracy - margin >= floor
            # Below the floor, a large joint step may still be recovering: fine-tune it again
            # while rounds are left and the last one helped.
            if accepted or finetune is None or rounds == recovery_rounds or (previous is not None and accuracy <= previous):
                break
            previous, rounds = accuracy, rounds + 1
        timing, ratio = run.against_dense(merged.module) or (None, None)
        step_sites = [s for c in chosen for s in c.sites]
        plans = [p for c in chosen for p in c.plans]
        step = CollapseStep(
            step=number, site="+".join(step_sites), kind="+".join(k for c in chosen for k in c.kinds),
            mode="+".join(sorted({m for c in chosen for m in c.modes})),
            score=float(np.mean([layer_score(p) for p in plans])) if plans else 1.0,
            channels=_channels(plans),
            probe_loss=None if chosen[0].losses is None else float(sum(c.losses.mean() for c in chosen)),
            pad_first=any(e["op"] == "pad_first" for e in step_edits), accuracy=accuracy, accepted=accepted,
            activations_removed=sum(len(h.sites) for h in history if h.accepted) + len(step_sites),
            layers_merged=dense_row["layers"] - layer_count(merged.module),
            params=cost.parameters(merged.module), macs=cost.macs(merged.module, inputs),
            macs_unmerged=cost.macs(model_step, inputs),
            latency_ms=None if timing is None else timing.median,
            merges=[m.to_dict() for m in merged.merges], refused=refused,
            model=Collapsed(merged.module).eval() if keep_models else None,
            sites=step_sites, candidates=[c.label for c in chosen],
            latency=None if timing is None else timing.to_dict(),
            segments=[{"label": c.label, **c.segment.to_dict()} for c in chosen], fit=fit,
            latency_ratio=None if ratio is None else _ratio(ratio), finetune_rounds=(finetune is not None) + rounds,
        )
        history.append(step)
        if not accepted and len(chosen) > 1:
            pending = chosen[: len(chosen) // 2]  # chosen is ordered by predicted loss
            continue
        if not accepted:
            stopped = (f"accuracy {accuracy:.4f}" + (f" less its standard error {margin:.4f}" if margin else "")
                       + f" fell below {floor:.4f} (max_accuracy_drop {max_accuracy_drop:g}); step undone")
            break
        working, current = model_step, merged
        run.free |= free
        edits.extend(step_edits)
        current_cost = _cost(history, dense_row, settings)
        bar.update(len(step_sites))
        bar.set_postfix_str(f"acc {accuracy:.4f}, layers -{step.layers_merged}")
        if checkpoint is not None:
            _save(checkpoint, working, edits, run.free, history, dense_row)
        if target_latency_ms is not None and step.latency_ms is not None and step.latency_ms <= target_latency_ms:
            stopped = "target latency reached"
            break
    bar.close()
    report = {
        "dense": dense_row,
        "steps": [h.to_dict() for h in history],
        "stopped": stopped,
        "latency_table": {"segments_timed": len(run.table), **run.table.settings},
        "settings": {k: v if not callable(v) else getattr(v, "__name__", "callable")
                     for k, v in settings.items() if k != "example_inputs"},
    }
    return CollapseResult(model=Collapsed(current.module).eval(), report=report, history=history)


def _evaluated(value: float | np.ndarray) -> tuple[float, np.ndarray | None]:
    """``evaluate``'s answer as (accuracy, per-sample scores or None for a plain number)."""
    scores = np.asarray(value, dtype=np.float64)
    if scores.ndim == 0:
        return float(scores), None
    if scores.ndim != 1 or scores.size == 0:
        raise InputError(f"evaluate must return a number or a 1-D array of per-sample scores, not shape {scores.shape}")
    return float(scores.mean()), scores


def _cost(history: list[CollapseStep], dense: dict[str, Any], settings: dict[str, Any]) -> float:
    """The current model's cost for the budget: its latency ratio to the dense model's, or MACs."""
    accepted = [h for h in history if h.accepted]
    if settings["by_latency"]:
        if not accepted:
            return 1.0
        if accepted[-1].latency_ratio is not None:
            return accepted[-1].latency_ratio["median"]
        return accepted[-1].latency_ms / dense["latency_ms_merged"]  # a checkpoint of an older run
    return accepted[-1].macs if accepted else dense["macs_merged"]


def _ratio(ratio: Timing) -> dict[str, float]:
    """A per-round latency ratio's median and quartiles (a Timing of ratios, not milliseconds)."""
    q1, q3 = ratio.quartiles
    return {"median": ratio.median, "q1": q1, "q3": q3, "rounds": len(ratio.rounds)}


def _channels(plans: list[ChannelPlan]) -> dict[str, int]:
    counts = {"channels": 0, "linearized": 0, "pruned": 0}
    for plan in plans:
        for key in counts:
            counts[key] += int(plan.to_dict()[key])
    return counts


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _seed(seed: int, step: int) -> None:
    value = seed * 1_000_003 + step
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


def _save(
    path: Path, working: fx.GraphModule, edits: list[dict], free: set[str], history: list[CollapseStep], dense: dict
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": _FORMAT,
        "edits": edits,
        "free": sorted(free),
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
    for edit in state["edits"]:
        names = {n.name for n in working.graph.nodes}
        needed = edit.get("site") or edit.get("conv") or edit.get("add")
        if needed not in names:
            raise InputError(f"{path}: node {needed!r} is not in this model: the checkpoint is for another model")
        _apply(working, edit, run.like)
    working.load_state_dict(state["state_dict"])
    run.free = set(state["free"])
    history = [CollapseStep.from_dict(row) for row in json.loads(state["history"])]
    return working.eval(), list(state["edits"]), history, json.loads(state["dense"])
