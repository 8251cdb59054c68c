"""collapse: TLC layer collapse on an ONNX graph — data-free, approximate, always measured.

Rule (the torch side, :mod:`normfold.torch.layer_collapse`, adds fine-tuning; this pass cannot):

1. A *site* is a ``Relu``, ``LeakyRelu``, ``PRelu`` or ``Clip(0, U)`` (ReLU6) node. Its channel
   statistics come from the ``BatchNormalization`` that alone feeds it (BN mode: ``N(β, γ²)``,
   run this pass *before* BN folding), or, when a calibration set is given, from the site's
   input over that set (empirical mode; always for a site after a residual Add, decision (a)).
   Without either, the site is refused.
2. Each site gets its per-channel plan (:func:`normfold.math.collapse_scores.channel_plan`) and its
   score, the mean channel score; sites are tried in ascending score order.
3. A site is a candidate only if linearizing it alone lets a merge happen (``Conv∘Conv``,
   residual shortcut into a Conv, ``Gemm∘Gemm``; see ``_collapse_merge``); otherwise it is
   refused with the merge's reason (a MaxPool between, a reader that is not a layer, MACs that
   would grow beyond ``max_flops_growth``).
4. ``remove=N`` linearizes the first N candidates. ``max_deviation=X`` (the default, 0.01)
   keeps each candidate in turn when the output deviation with it and those kept before stays
   within X, and refuses it with the measured deviation otherwise.
   Deviation: over the calibration inputs (or three random draws shaped from the model), the
   largest ``|y − y_ref|`` of any output divided by that output's largest ``|y_ref|``.
   ``target_latency=R`` (a budget) chooses the removals **jointly** instead:

   a. A candidate is a run of up to ``max_segment_sites`` activations consecutive in graph
      order among those that stay (one that cannot be removed counts, so a run never jumps it;
      one removed in an earlier step does not: the layers around it are one segment now) whose
      linearization lets layers merge — the two activations of an inverted residual make one
      candidate although each alone grows the work. Merges are then not limited by
      ``max_flops_growth``: a candidate is judged by its final merged form.
   b. Its cost is the **whole model** with it applied, batch 1, by :class:`CostMeter`: the
      onnxruntime latency (``ORT_ENABLE_ALL``, one thread; the median of ``latency_repeats``
      rounds of ``latency_runs`` runs, IQR kept; timings cached by structure and input shapes),
      or its MACs when ``measure_latency`` is False. Its saving is the BN-folded dense model's
      cost minus that; a candidate saving nothing, or (timed) no more than the larger IQR of
      the two timings, is refused with the numbers. Timing the
      whole model rather than the segment keeps every layout effect of the merge in the number
      and needs no subgraph extraction; the price is that on a large model one candidate's
      saving can drown in the whole model's spread (the report has both).
   c. Its predicted loss is the sum of its sites' scores, or with ``calibration`` the output
      deviation measured with it alone. With ``max_deviation`` given, a candidate over it is
      refused, and so is the lossiest run of a joint choice over it (then the choice is made
      again without it).
   d. :func:`normfold.math.collapse_select.choose` (a dynamic program) picks the runs saving
      what the budget still needs (the current cost minus ``R`` × the dense cost) with the
      least summed loss; two runs are separated by a kept activation unless a fan-out between
      them stops any merge across. When no choice reaches the budget, the one saving the most.
   e. The choice is applied and the whole model measured; a step that measures no better than
      before is undone and ends the search. Savings measured one candidate at a time need not
      add up, so while the measured cost is over the budget, another step (up to
      ``max_steps``) chooses among the remaining activations, each candidate now costed on top
      of the removals already made. :attr:`CollapsePass.selection` holds every step and every
      candidate (cost, saving, loss, refused or chosen), the dense, predicted and measured cost.
5. A linearized site becomes ``a·y + c`` per channel: folded into the BatchNorm's scale and
   shift in BN mode (``γ' = a·γ``, ``β' = a·β + c``), a ``Mul``/``Add`` pair otherwise. Then
   ``fold-bn`` and ``fold-affine`` (exact) fold those into the neighbouring layers and the merge
   rules run until nothing changes.

The pass never claims exactness (``exact = False``: it is not in the default pass list). Its
record holds one site per linearized activation (with mode, score and channels) and per merge,
and a note with the measured deviation; :attr:`CollapsePass.deviation` keeps the numbers. The
deviation is measured once: with ``max_deviation`` it is the one selection measured for the
chosen set; with ``remove`` and ``measure=False`` (what the ``normfold collapse`` job passes,
since it verifies the final model itself) the pass measures nothing and ``deviation`` is None.
"""

from __future__ import annotations

__all__ = ["COLLAPSE_SITES", "CollapsePass", "CostMeter", "DEFAULT_MAX_DEVIATION", "dense_form"]

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from normfold.catalog import pass_info
from normfold.passes.base import NormfoldPass, PassOptions, PassRecord, apply_rules
from normfold.passes._shapes import infer_shapes
from normfold.passes._collapse_merge import (
    ClassifierIntoConv,
    ConvShortcut,
    MergeConvConv,
    MergeGemmGemm,
)
from normfold.errors import Refusal
from normfold.passes._fold_graph import (
    FreshNames,
    Reads,
    attribute,
    cast_tensor,
    rank_of,
    read_constant,
)
from normfold.passes._collapse_cost import CostMeter, dense_form
from normfold.passes.fold_affine import FoldAffinePass
from normfold.passes.fold_bn import FoldBatchNormPass

from normfold import runtime
from normfold.math.collapse_scores import ChannelPlan, channel_plan, layer_score
from normfold.math.collapse_select import Option, choose, quantize
from normfold.errors import InputError
from normfold.inputs import generate_inputs

DEFAULT_MAX_DEVIATION = 0.01
# The activations a collapse site can be (Clip as ReLU6).
COLLAPSE_SITES = ("Relu", "LeakyRelu", "PRelu", "Clip")
# Savings are quantized for the dynamic program in this fraction of what the budget needs.
_RESOLUTION = 200


@dataclasses.dataclass
class _Site:
    node: str
    op: str
    mode: str  # bn | empirical
    plan: ChannelPlan
    axis: int
    rank: int

    @property
    def score(self) -> float:
        return layer_score(self.plan)


class CollapsePass(NormfoldPass):
    """Linearize the activations closest to linear and merge the layers around them (approximate)."""

    name = "collapse"
    summary = pass_info(name).summary
    exact = pass_info(name).exact

    def __init__(
        self,
        options: PassOptions | None = None,
        *,
        remove: int | None = None,
        max_deviation: float | None = None,
        calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
        max_flops_growth: float = 1.0,
        samples: int = 3,
        measure: bool = True,
        target_latency: float | None = None,
        measure_latency: bool = True,
        max_segment_sites: int = 2,
        latency_runs: int = 50,
        latency_repeats: int = 5,
        max_steps: int = 3,
        meter: CostMeter | None = None,
    ) -> None:
        super().__init__(options)
        if remove is not None and max_deviation is not None:
            raise InputError("collapse: give either remove or max_deviation, not both")
        if remove is not None and target_latency is not None:
            raise InputError("collapse: give either remove or target_latency, not both")
        if remove is not None and remove < 0:
            raise InputError(f"collapse: remove must be >= 0, not {remove}")
        if target_latency is not None and not 0 < target_latency <= 1:
            raise InputError(f"collapse: target_latency is a ratio in (0, 1], not {target_latency:g}")
        if max_deviation is not None and not max_deviation >= 0:
            raise InputError(f"collapse: max_deviation must be >= 0, not {max_deviation:g}")
        if max_segment_sites < 1 or latency_runs < 1 or max_steps < 1 or latency_repeats < 3:
            raise InputError("collapse: max_segment_sites, latency_runs and max_steps must be >= 1, "
                             "latency_repeats >= 3 (for a spread)")
        self.remove = remove
        # The default bound holds under a budget too: a collapse without fine-tuning that meets
        # its latency by changing the output beyond it is not what anyone asked for. An infinite
        # bound is none (nothing to measure, and JSON has no infinity).
        self.max_deviation = (
            DEFAULT_MAX_DEVIATION if remove is None and max_deviation is None
            else None if max_deviation == math.inf else max_deviation
        )
        self.calibration = list(calibration) if calibration is not None else None
        self.max_flops_growth = max_flops_growth
        self.samples = samples
        self.measure = measure
        self.target_latency = target_latency
        self.measure_latency = measure_latency
        self.max_segment_sites = max_segment_sites
        self.max_steps = max_steps
        self.latency_settings = {"runs": latency_runs, "repeats": latency_repeats}
        self.deviation: dict[str, Any] | None = None
        # With target_latency: what was measured and chosen (see _budget); the meter that timed it
        # (a caller's, to share its timings, else one built with the latency settings above).
        self.selection: dict[str, Any] | None = None
        self.meter = meter

    def apply(self, model: ir.Model) -> bool:
        common.NameFixPass()(model)
        infer_shapes(model)
        reference = model.clone()
        feeds = self.calibration or [generate_inputs(reference, seed=k) for k in range(self.samples)]
        expected = [runtime.run(reference, f) for f in feeds]
        sites = self._sites(reference, feeds)
        if self.target_latency is not None:
            chosen, deviation = self._budget(reference, sites, feeds, expected)
        else:
            candidates = []
            for site in sorted(sites, key=lambda s: s.score):
                _, reason = self._trial(reference, [site])
                if reason is None:
                    candidates.append(site)
                else:
                    self.record.refuse(Refusal(reason), site.node)
            chosen, deviation = self._choose(reference, candidates, feeds, expected)
        if not chosen:
            self.record.notes.append("collapse: no activation removed")
            self.deviation = {"max_rel_deviation": 0.0, "max_abs_deviation": 0.0}
            return False
        self._collapse(model, chosen, self.record)
        for site in chosen:
            self.record.site(site.node, op=site.op, how="linearized", mode=site.mode, score=site.score,
                             **{k: v for k, v in site.plan.to_dict().items() if k != "score"})
        self.deviation = deviation
        self.record.notes.append(
            f"approximate: {len(chosen)} activation(s) linearized; " + (
                "output deviation not measured here (the caller verifies the result)" if deviation is None else
                f"measured output deviation {deviation['max_rel_deviation']:.3g} relative, "
                f"{deviation['max_abs_deviation']:.3g} absolute over {len(feeds)} input sample(s)"
            )
        )
        return True

    @property
    def _growth(self) -> float:
        # Under a budget a candidate is judged by its final form's measured cost, not per merge.
        return math.inf if self.target_latency is not None else self.max_flops_growth

    # -- sites ------------------------------------------------------------------------------
    def _sites(self, model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[_Site]:
        found, empirical = [], []
        for node in model.graph:
            if node.op_type not in COLLAPSE_SITES or node.domain not in ("", "ai.onnx"):
                continue
            with self.record.refusing(node):
                kind, slope, upper = _activation(node)
                rank = rank_of(node.inputs[0])
                if rank is None:
                    raise Refusal("the rank of its input is unknown")
                if node.outputs[0].is_graph_output():
                    raise Refusal("it is a model output: there is no layer after it to merge")
                bn = _batchnorm_before(node)
                if bn is not None:
                    reads = Reads(self.options.freeze_initializer_inputs)
                    gamma = read_constant(bn.inputs[1], "BatchNormalization scale", reads)
                    beta = read_constant(bn.inputs[2], "BatchNormalization bias", reads)
                    plan = channel_plan(kind, beta, gamma, negative_slope=slope, upper=upper)
                    found.append(_Site(node.name, node.op_type, "bn", plan, 1, rank))
                elif self.calibration is None:
                    raise Refusal(
                        "no BatchNormalization feeds it directly and no calibration data was given "
                        "(an activation after a residual Add is scored from data)"
                    )
                else:
                    empirical.append((node, kind, slope, upper, rank))
        if empirical:
            found.extend(self._empirical(model, empirical, feeds))
        return found

    def _empirical(self, model: ir.Model, nodes: list[tuple], feeds: list[dict[str, np.ndarray]]) -> list[_Site]:
        probe = model.clone()
        by_name = {n.name: n for n in probe.graph}
        watched = []
        for node, *_ in nodes:
            twin = by_name[node.name]
            for value in (twin.inputs[0], twin.outputs[0]):
                if value.dtype is None:
                    value.dtype = ir.DataType.FLOAT
                if value not in probe.graph.outputs:
                    probe.graph.outputs.append(value)
            watched.append((twin.inputs[0].name, twin.outputs[0].name))
        session = runtime.session(probe)
        runs = [runtime.run(session, f) for f in feeds]
        sites = []
        for (node, kind, slope, upper, rank), (source, target) in zip(nodes, watched):
            axis = _channel_axis(node, rank)
            x = np.concatenate([np.moveaxis(r[source], axis, -1).reshape(-1, r[source].shape[axis]) for r in runs])
            y = np.concatenate([np.moveaxis(r[target], axis, -1).reshape(-1, r[target].shape[axis]) for r in runs])
            x, y = x.astype(np.float64), y.astype(np.float64)
            plan = channel_plan(kind, x.mean(0), x.std(0), negative_slope=slope, upper=upper, output_mean=y.mean(0))
            sites.append(_Site(node.name, node.op_type, "empirical", plan, axis, rank))
        return sites

    # -- selection --------------------------------------------------------------------------
    def _choose(
        self, reference: ir.Model, candidates: list[_Site], feeds: list[dict], expected: list[dict]
    ) -> tuple[list[_Site], dict[str, Any] | None]:
        if self.remove is not None:
            chosen = candidates[: self.remove]
            if len(chosen) < self.remove:
                self.record.notes.append(f"collapse: asked to remove {self.remove}, only {len(chosen)} can merge")
            if not self.measure:
                return chosen, None
            return chosen, _deviation(self._trial(reference, chosen)[0], feeds, expected)
        chosen, deviation = [], {"max_rel_deviation": 0.0, "max_abs_deviation": 0.0}
        for site in candidates:
            measured = _deviation(self._trial(reference, chosen + [site])[0], feeds, expected)
            if measured["max_rel_deviation"] > self.max_deviation:
                self.record.refuse(Refusal(
                    f"with it the output deviation would be {measured['max_rel_deviation']:.3g} "
                    f"> max_deviation {self.max_deviation:g}"
                ), site.node)
                continue
            chosen, deviation = chosen + [site], measured
        return chosen, deviation

    def _budget(
        self, reference: ir.Model, sites: list[_Site], feeds: list[dict], expected: list[dict]
    ) -> tuple[list[_Site], dict[str, Any] | None]:
        """The removals chosen jointly, step by step, to meet ``target_latency`` (rules in the module doc)."""
        if self.meter is None:
            self.meter = CostMeter(reference, feeds[0], measure=self.measure_latency, **self.latency_settings)
        meter = self.meter
        unit = "ms" if meter.measure else "MACs"
        dense = dense_form(reference)
        dense_cost = meter.cost(dense)
        target = self.target_latency * dense_cost
        self.selection = selection = {
            "by": "latency" if meter.measure else "macs", "unit": unit, "target_latency": self.target_latency,
            "dense_cost": dense_cost, "target_cost": target,
            "dense_latency": meter.timing(dense).to_dict() if meter.measure else None,
            "max_segment_sites": self.max_segment_sites, "steps": [], "chosen": [], "options": [],
            "predicted_cost": dense_cost, "measured_cost": dense_cost, "feasible": target >= dense_cost,
        }
        chosen: list[_Site] = []
        # Candidates are costed against the graph with nothing linearized but folded and merged as
        # their trials are (layers already adjacent merge there too), not against the dense form.
        current, deviation = meter.cost(self._trial(reference, [])[0]), None
        for step in range(1, self.max_steps + 1):
            if current <= target:
                break
            picked, row = self._step(reference, sites, chosen, current, target, feeds, expected)
            row["step"] = step
            selection["steps"].append(row)
            selection["options"] += [{**option, "step": step} for option in row.pop("options")]
            if not picked:
                break
            applied, _ = self._trial(reference, chosen + picked)
            row["measured_cost"] = measured = meter.cost(applied)
            if meter.measure:
                row["measured_latency"] = meter.timing(applied).to_dict()
            if measured >= current:
                # The candidates' savings did not add up on the whole model: give the step back.
                row["undone"] = (f"the whole model measured {_amount(measured, unit)}, no less than "
                                 f"{_amount(current, unit)} before the step")
                for option in selection["options"]:
                    if option["step"] == step and option.get("chosen"):
                        option["chosen"] = False
                self.record.notes.append(f"collapse: step {step} undone: {row['undone']}")
                break
            chosen += picked
            current, deviation = measured, row.pop("deviation", None)
            selection["chosen"] += row["chosen"]
            selection["predicted_cost"] = row["predicted_cost"]
            selection["measured_cost"] = measured
        selection["feasible"] = selection["measured_cost"] <= target
        if not selection["feasible"]:
            self.record.notes.append(
                f"collapse: target_latency {self.target_latency:g} not reached: the whole model measured "
                f"{_amount(selection['measured_cost'], unit)} against {_amount(dense_cost, unit)} dense")
        # A site refused alone but removed in a chosen run is not refused: its row keeps the reason.
        removed = {site.node for site in chosen}
        self.record.keep_refusals_of({r["node"] for r in self.record.refused if r["node"] not in removed})
        if not self.measure:
            return chosen, None
        if deviation is None and chosen:
            deviation = _deviation(self._trial(reference, chosen)[0], feeds, expected)
        return chosen, deviation

    def _step(
        self, reference: ir.Model, sites: list[_Site], fixed: list[_Site], current: float, target: float,
        feeds: list[dict], expected: list[dict],
    ) -> tuple[list[_Site], dict[str, Any]]:
        """One joint choice on top of the ``fixed`` removals, whose model costs ``current``."""
        meter = self.meter
        assert meter is not None
        unit_name = "ms" if meter.measure else "MACs"
        # Positions over the activations that stay: with the removed ones gone, the layers on both
        # sides of them are one segment, so the runs either side touch (one choice, or a run).
        taken = {site.node for site in fixed}
        nodes = [n for n in reference.graph
                 if n.op_type in COLLAPSE_SITES and n.domain in ("", "ai.onnx") and n.name not in taken]
        position = {node.name: k for k, node in enumerate(nodes)}
        found = sorted((s for s in sites if s.node not in taken), key=lambda s: position[s.node])
        base, _ = self._trial(reference, fixed)
        spread_now = meter.timing(base).iqr if meter.measure else 0.0
        bounded = self.max_deviation is not None
        rows: list[dict[str, Any]] = []
        runs: dict[str, list[_Site]] = {}
        for length in range(1, self.max_segment_sites + 1):
            for k in range(len(found) - length + 1):
                run = found[k:k + length]
                first = position[run[0].node]
                if [position[s.node] for s in run] != list(range(first, first + length)):
                    continue  # an activation that stays lies between them
                label = "+".join(s.node for s in run)
                trial, reason = self._trial(reference, fixed + run)
                if reason is not None:
                    if length == 1:
                        self.record.refuse(Refusal(reason), label)
                    continue
                cost = meter.cost(trial)
                row: dict[str, Any] = {"sites": [s.node for s in run], "cost": cost, "saving": current - cost,
                                       "score": sum(s.score for s in run)}
                if meter.measure:
                    row["latency"] = meter.timing(trial).to_dict()
                if self.calibration is not None or bounded:
                    row["deviation"] = _deviation(trial, feeds, expected)["max_rel_deviation"]
                row["loss"] = row["deviation"] if self.calibration is not None else row["score"]
                rows.append(row)
                # A saving inside the spread of either timing is noise, not a measured gain.
                spread = max(spread_now, row["latency"]["iqr_ms"]) if meter.measure else 0.0
                change = f"the whole model {_amount(current, unit_name)} -> {_amount(cost, unit_name)}"
                if row["saving"] <= 0:
                    reason = f"its final merged form {'runs no faster' if meter.measure else 'costs no fewer MACs'} ({change})"
                elif row["saving"] <= spread:
                    reason = f"its saving is within the timings' spread ({change}, IQR up to {spread:.4f} ms)"
                elif bounded and row["deviation"] > self.max_deviation:
                    reason = (f"with it the output deviation would be {row['deviation']:.3g} "
                              f"> max_deviation {self.max_deviation:g}")
                else:
                    runs[label] = run
                    continue
                row["refused"] = reason
                self.record.refuse(Refusal(reason), label)
        need = current - target
        step: dict[str, Any] = {"base_cost": current, "need": need, "options": rows, "chosen": [],
                                "predicted_cost": current, "feasible": need <= 0}
        if meter.measure:
            step["base_latency"] = meter.timing(base).to_dict()
        if need <= 0 or not runs:
            return [], step
        unit = need / _RESOLUTION
        by_label = {"+".join(r["sites"]): r for r in rows}
        options = [
            Option(position[run[0].node], position[run[-1].node] + 1, q, by_label[label]["loss"], label)
            for (label, run), q in zip(runs.items(), quantize([by_label[l]["saving"] for l in runs], unit))
        ]
        separate = [b for b in range(1, len(nodes)) if _separate(nodes[b - 1], nodes[b])]
        while True:
            picked = choose(options, len(nodes), math.ceil(need / unit), separate)
            labels = [o.label for o in picked.options]
            chosen = [site for label in labels for site in runs[label]]
            if not bounded or not chosen:
                break
            deviation = _deviation(self._trial(reference, fixed + chosen)[0], feeds, expected)
            if deviation["max_rel_deviation"] <= self.max_deviation:
                step["deviation"] = deviation
                break
            # The joint deviation is over the bound: give up the choice's most lossy run.
            worst = max(picked.options, key=lambda o: o.loss)
            by_label[worst.label]["refused"] = reason = (
                f"with the other chosen removals the output deviation would be "
                f"{deviation['max_rel_deviation']:.3g} > max_deviation {self.max_deviation:g}"
            )
            self.record.refuse(Refusal(reason), worst.label)
            options = [o for o in options if o.label != worst.label]
        for label in labels:
            by_label[label]["chosen"] = True
        step.update(chosen=labels, feasible=picked.feasible,
                    predicted_cost=current - sum(by_label[label]["saving"] for label in labels))
        return chosen, step

    # -- rewriting --------------------------------------------------------------------------
    def _trial(self, reference: ir.Model, sites: list[_Site]) -> tuple[ir.Model, str | None]:
        """A clone of ``reference`` with ``sites`` linearized and merged (:meth:`_collapse`), and
        the reason no layers merged there, or None when some did."""
        model, record = reference.clone(), PassRecord(self.name)
        if self._collapse(model, sites, record):
            return model, None
        return model, record.refused[0]["reason"] if record.refused else "linearizing it lets no layers merge"

    def _collapse(self, model: ir.Model, sites: list[_Site], record: PassRecord) -> int:
        """Linearize ``sites`` in ``model``, fold, merge; returns the number of merges (each
        merge's MACs growth bounded by :attr:`_growth`)."""
        growth = self._growth
        nodes = {n.name: n for n in model.graph}
        fresh = FreshNames(model)
        for site in sites:
            _linearize(model, nodes[site.node], site, fresh)
        merges = 0
        while True:
            # A merge can put a Mul/Add right after a Conv (a folded shortcut): fold again.
            FoldBatchNormPass(self.options)(model)
            FoldAffinePass(self.options)(model)
            rules = [
                MergeConvConv(record, self.options, fresh, growth),
                ConvShortcut(record, self.options, fresh, growth, form="conv-first"),
                ConvShortcut(record, self.options, fresh, growth, form="conv-second"),
                ConvShortcut(record, self.options, fresh, growth, form="projection"),
                MergeGemmGemm(record, self.options, fresh, growth),
                ClassifierIntoConv(record, self.options, fresh, growth),
            ]
            count = apply_rules(model, rules)
            if not count:
                break
            merges += count
        common.RemoveUnusedNodesPass()(model)
        return merges




def _amount(value: float, unit: str) -> str:
    return f"{value:.4f} ms" if unit == "ms" else f"{value:.0f} MACs"


def _separate(before: ir.Node, site: ir.Node) -> bool:
    """Whether the layers between two consecutive sites cannot merge through each other.

    Walking back from ``site``'s input through ops with one non-constant input, a value read
    by more than one op (a residual stream that fans out) or an op with several non-constant
    inputs stops any merge across; reaching ``before`` by a single-reader chain does not.
    """
    value = site.inputs[0]
    while value is not None:
        producer = value.producer()
        if producer is before:
            return False
        if producer is None or len(list(value.uses())) > 1 or value.is_graph_output():
            return True
        moving = [v for v in producer.inputs if v is not None and v.const_value is None]
        if len(moving) != 1:
            return True
        value = moving[0]
    return True


def _activation(node: ir.Node) -> tuple[str, Any, float]:
    if node.op_type == "Relu":
        return "relu", 0.0, 6.0
    if node.op_type == "LeakyRelu":
        return "leaky_relu", float(attribute(node, "alpha", 0.01)), 6.0
    if node.op_type == "PRelu":
        slope = read_constant(node.inputs[1], "PRelu slope", Reads(False))
        return "prelu", slope.reshape(-1), 6.0
    low = _clip_bound(node, 1, "min")
    high = _clip_bound(node, 2, "max")
    if low != 0.0 or high is None or high <= 0.0:
        raise Refusal(f"Clip({low}, {high}) is not a ReLU6-like clip(y, 0, U)")
    return "relu6", 0.0, high


def _clip_bound(node: ir.Node, index: int, name: str) -> float | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        return float(read_constant(node.inputs[index], f"Clip {name}", Reads(False)))
    value = attribute(node, name, None)  # opset < 11
    return None if value is None else float(value)


def _batchnorm_before(node: ir.Node) -> ir.Node | None:
    producer = node.inputs[0].producer()
    if producer is None or producer.op_type != "BatchNormalization" or len(producer.outputs) != 1:
        return None
    if producer.outputs[0].is_graph_output() or len(list(producer.outputs[0].uses())) != 1:
        return None
    return producer


def _channel_axis(node: ir.Node, rank: int) -> int:
    """1 after a Conv, Gemm or BatchNorm; the last axis after a MatMul (looking back through Adds)."""
    value = node.inputs[0]
    for _ in range(16):
        producer = value.producer()
        if producer is None:
            break
        if producer.op_type in ("Conv", "ConvTranspose", "Gemm", "BatchNormalization"):
            return 1
        if producer.op_type == "MatMul":
            return rank - 1
        value = producer.inputs[0]
    return 1


def _linearize(model: ir.Model, node: ir.Node, site: _Site, fresh: FreshNames) -> None:
    graph = model.graph
    slope, offset = site.plan.slope, site.plan.offset
    if site.mode == "bn":
        bn = node.inputs[0].producer()
        reads = Reads(True)
        gamma = read_constant(bn.inputs[1], "scale", reads)
        beta = read_constant(bn.inputs[2], "bias", reads)
        dtype = bn.inputs[1].const_value.dtype
        for index, values in ((1, slope * gamma), (2, slope * beta + offset)):
            bn.replace_input_with(index, _constant(graph, values, dtype, fresh(f"{bn.name}_linearized")))
        ir.convenience.replace_all_uses_with(node.outputs[0], bn.outputs[0])
        graph.remove(node, safe=True)
        return
    dtype = node.inputs[0].dtype or ir.DataType.FLOAT
    shape = [-1] + [1] * (site.rank - 1 - site.axis)
    scale = _constant(graph, slope.reshape(shape), dtype, fresh(f"{node.name}_slope"))
    shift = _constant(graph, offset.reshape(shape), dtype, fresh(f"{node.name}_offset"))
    mul = ir.node("Mul", [node.inputs[0], scale], name=f"{node.name}/Mul")
    add = ir.node("Add", [mul.outputs[0], shift], name=f"{node.name}/Add")
    graph.insert_before(node, [mul, add])
    ir.convenience.replace_all_uses_with(node.outputs[0], add.outputs[0])
    graph.remove(node, safe=True)


def _constant(graph: ir.Graph, array: np.ndarray, dtype: ir.DataType, name: str) -> ir.Value:
    value = ir.Value(name=name, const_value=cast_tensor(array, dtype, name))
    graph.register_initializer(value)
    return value


def _deviation(model: ir.Model, feeds: list[dict], expected: list[dict]) -> dict[str, Any]:
    """Largest per-output relative and absolute deviation from ``expected`` (onnxruntime, optimizations off)."""
    session = runtime.session(model)
    worst_rel = worst_abs = 0.0
    agree, total = 0, 0
    for feed, reference in zip(feeds, expected):
        outputs = runtime.run(session, feed)
        for name, want in reference.items():
            got = outputs[name].astype(np.float64)
            want = want.astype(np.float64)
            error = float(np.abs(got - want).max()) if want.size else 0.0
            worst_abs = max(worst_abs, error)
            worst_rel = max(worst_rel, error / max(float(np.abs(want).max()), 1e-12))
            if want.ndim == 2 and want.shape[1] > 1:
                agree += int((got.argmax(1) == want.argmax(1)).sum())
                total += want.shape[0]
    result: dict[str, Any] = {"max_rel_deviation": worst_rel, "max_abs_deviation": worst_abs}
    if total:
        result["argmax_agreement"] = agree / total
    return result
