"""Real timm models through normfold: BN folds and multi-branch re-parameterization (issue 14).

    python -m benchmarks.timm_reparam [--models repvgg_a0,mobileone_s0,levit_128s]
                                      [--variants ts13,ts13-nofold,...] [--latency] [--json out.json]

timm's own model code (``timm.create_model(name, pretrained=False, num_classes=10)``, no weights
downloaded; ``pip install --no-deps timm huggingface_hub safetensors pyyaml`` beside torchvision,
which :mod:`benchmarks.torchvision_schemas` makes importable) with statistics a trained network
has: every BatchNorm's affine drawn at random (weight in [0.2, 0.6], bias in [-0.1, 0.1]), its
running statistics measured on one random batch (train mode, cumulative average) and then
perturbed (mean by 0.1 std, variance by a factor in [0.75, 1.25]) so no fold is trivial. The
small weights keep LeViT's attention from amplifying float32 rounding (with weights near 1 its
own float32 run is 8% off its float64 run, and no comparison means anything).

Each model is exported with the zoo's export variants (:data:`normfold.models.export.VARIANTS`:
TorchScript at opsets 13 and 17 with and without constant folding, initializers as inputs,
dynamo at opset 18 with and without its optimizer, …) and goes through
:func:`normfold.inspect` and :func:`normfold.optimize` (the default passes; the ``-inputs``
variant with ``freeze_initializer_inputs``, as its weights are graph inputs otherwise). Per row:

- ``BN``: BatchNormalization nodes in the export → in normfold's output;
- ``sums``: multi-branch sums in the export → in the output: an ``Add``/``Sum`` two of whose
  terms are branches of one tensor, at least one a Conv (``Conv(x)``, ``AveragePool(x)`` or
  ``x``, each maybe through a BN);
- ``merged``: the sums fold-branches merged into one Conv; ``Conv``: Conv nodes in the output,
  and in timm's own ``reparameterize_model`` result exported with ``ts17-nofold`` (the
  deployment form the model's authors wrote);
- ``max rel``: the verification's largest error relative to each output's largest magnitude
  (onnxruntime, optimizations off on both models, 3 random batches; PASS/FAIL at its default
  tolerance); ``inspect``: whether :func:`normfold.inspect` planned the sites optimize applied;
- with ``--latency``: batch-1 onnxruntime latency of the export and of the output
  (:func:`normfold.latency.measure`: optimizations on, one thread, median of rounds).

Every BN left is listed with the reason normfold gives. The exit code is 1 when a row fails: an
export or pass that raises, a failed verification, a BN or branch sum left without a recorded
reason, or an inspect plan that differs from what optimize applied. Without timm it prints why
and exits 0.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MODELS", "DEFAULT_VARIANTS", "Row", "branch_sums", "build", "main", "run"]

import argparse
import collections
import copy
import dataclasses
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import normfold
from normfold.latency import measure

# name -> image size: small where the model allows any size; LeViT's attention biases are laid
# out for its default 224×224.
DEFAULT_MODELS: dict[str, int] = {
    "repvgg_a0": 64,
    "mobileone_s0": 64,
    "mobileone_s1": 64,
    "levit_128s": 224,
    "fastvit_t8": 64,
    "repghostnet_050": 64,
}
DEFAULT_VARIANTS = ("ts13", "ts13-nofold", "ts17", "ts17-nofold", "ts13-inputs", "dynamo18", "dynamo18-noopt")
_BRANCH_OPS = frozenset({"Conv", "AveragePool"})


@dataclasses.dataclass
class Row:
    """One (model, export variant) through normfold."""

    model: str
    variant: str
    bn: tuple[int, int] = (0, 0)
    sums: tuple[int, int] = (0, 0)
    merged: int = 0
    convs: int = 0
    timm_convs: int | None = None
    max_rel: float | None = None
    verified: bool = False
    inspect_agrees: bool = False
    latency_ms: tuple[float, float] | None = None
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # BN left -> reason
    error: str | None = None

    @property
    def failures(self) -> list[str]:
        """Why this row fails the issue's bar (empty: it passes)."""
        if self.error:
            return [self.error]
        problems = []
        if not self.verified:
            problems.append(f"verification failed (max rel {self.max_rel})")
        if not self.inspect_agrees:
            problems.append("inspect planned other sites than optimize applied")
        problems += [f"BN {node} left without a reason" for node, reason in self.refused.items() if not reason]
        if self.sums[1]:
            problems.append(f"{self.sums[1]} multi-branch sum(s) left")
        return problems


def _timm() -> Any:
    from benchmarks import torchvision_schemas

    torchvision_schemas.define()
    import timm

    return timm


def build(name: str, size: int, *, seed: int = 0) -> Any:
    """A :class:`normfold.models.ZooModel` of timm's ``name`` with trained-like BN statistics."""
    import torch

    from normfold.models import ZooModel

    timm = _timm()
    torch.manual_seed(seed)
    module = timm.create_model(name, pretrained=False, num_classes=10)
    generator = torch.Generator().manual_seed(seed + 1)
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            if norm.weight is not None:
                norm.weight.copy_(torch.rand(norm.num_features, generator=generator) * 0.4 + 0.2)
                norm.bias.copy_(torch.rand(norm.num_features, generator=generator) * 0.2 - 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: one batch gives that batch's statistics
        module.train()
        module(torch.randn(8, 3, size, size, generator=generator))
        for norm in norms:
            shift = torch.randn(norm.num_features, generator=generator) * 0.1
            norm.running_mean.add_(shift * norm.running_var.sqrt())
            norm.running_var.mul_(torch.rand(norm.num_features, generator=generator) * 0.5 + 0.75)
    module.eval()
    example = torch.randn(2, 3, size, size, generator=generator)
    axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
    return ZooModel(name, module, (example,), ("images",), ("logits",), axes)


def branch_sums(model: ir.Model) -> int:
    """``Add``/``Sum`` nodes two of whose terms are branches of one tensor, one of them a Conv.

    A term ``Conv(x)`` (or ``BN(Conv(x))``) is a Conv branch of ``x`` and an identity branch of
    the Conv's output; ``AveragePool(x)`` a branch of ``x``; anything else an identity branch.
    """
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ("Add", "Sum") or node.domain != "":
            continue
        readings: list[set[tuple[int, bool]]] = []  # per term: (source, through a Conv)
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer is not None and producer.op_type == "BatchNormalization":
                value = producer.inputs[0]
                producer = value.producer()
            reading = {(id(value), False)}
            if producer is not None and producer.op_type in _BRANCH_OPS:
                reading.add((id(producer.inputs[0]), producer.op_type == "Conv"))
            readings.append(reading)
        count += any(
            source == other and (conv or other_conv)
            for i, first in enumerate(readings) for second in readings[i + 1:]
            for source, conv in first for other, other_conv in second
        )
    return count


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))


def _timm_convs(zoo: Any, folder: Path) -> int:
    """Conv nodes of timm's own re-parameterized model, exported ``ts17-nofold``."""
    from normfold.models.export import export

    deployed = dataclasses.replace(zoo, module=_timm().utils.reparameterize_model(copy.deepcopy(zoo.module)))
    path = export(deployed, "ts17-nofold", folder / f"{zoo.name}-timm-reparam.onnx")
    return _ops(ir.load(str(path)))["Conv"]


def _applied(passes: list[dict[str, Any]]) -> dict[str, int]:
    return {entry["name"]: entry["applied"] for entry in passes}


def _reasons(report: dict[str, Any]) -> dict[str, str]:
    """Each refused node's reasons, joined (a node may be refused by several passes)."""
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for entry in report["passes"]:
        for refusal in entry["refused"]:
            reasons[refusal["node"]].append(f"{entry['name']}: {refusal['reason']}")
    return {node: "; ".join(texts) for node, texts in reasons.items()}


def _latency(path: Path | ir.Model, size: int) -> float:
    proto = onnx.load(str(path)) if isinstance(path, Path) else ir.serde.serialize_model(path)
    feeds = {"images": np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)}
    return measure(proto, feeds, runs=20, repeats=3, warmup=3, threads=1).median


def run_variant(zoo: Any, size: int, variant: str, folder: Path, *, latency: bool) -> Row:
    """Export ``zoo`` with ``variant`` and put the file through normfold."""
    from normfold.models.export import VARIANTS, export

    row = Row(zoo.name, variant)
    try:
        path = export(zoo, variant, folder / f"{zoo.name}-{variant}.onnx")
        source = ir.load(str(path))
        freeze = VARIANTS[variant].initializers_as_inputs
        plan = normfold.inspect(path)
        result = normfold.optimize(path, freeze_initializer_inputs=freeze)
    except Exception as error:  # a crash is a result here: report it, go on with the others
        row.error = f"{type(error).__name__}: {error}"
        return row
    before, after = _ops(source), _ops(result.model)
    row.bn = (before["BatchNormalization"], after["BatchNormalization"])
    row.sums = (branch_sums(source), branch_sums(result.model))
    row.merged = _applied(result.report["passes"]).get("fold-branches", 0)
    row.convs = after["Conv"]
    row.verified = result.verified
    row.max_rel = result.report["verification"]["max_rel_error"]
    # inspect runs on the unfrozen file: with frozen inputs optimize may apply more.
    row.inspect_agrees = freeze or _applied(plan["passes"]) == _applied(result.report["passes"])
    reasons = _reasons(result.report)
    for node in ir.traversal.RecursiveGraphIterator(result.model.graph):
        if node.op_type == "BatchNormalization":
            row.refused[node.name] = reasons.get(node.name, "")
    if latency:
        row.latency_ms = (_latency(path, size), _latency(result.model, size))
    return row


def run(models: dict[str, int], variants: tuple[str, ...], folder: Path, *, latency: bool = False,
        progress: bool = True) -> list[Row]:
    """Every model with every variant; ``timm_convs`` filled in from timm's own reparameterization."""
    rows = []
    for name, size in models.items():
        zoo = build(name, size)
        try:
            timm_convs = _timm_convs(zoo, folder)
        except Exception as error:  # noqa: BLE001 - shown in the table, not fatal
            print(f"{name}: timm's reparameterize_model export failed: {error}", file=sys.stderr)
            timm_convs = None
        for variant in variants:
            row = run_variant(zoo, size, variant, folder, latency=latency)
            row.timm_convs = timm_convs
            rows.append(row)
            if progress:
                print(f"  {name} {variant}: {'ok' if not row.failures else '; '.join(row.failures)}",
                      file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table and, below it, every BN left with its reason (once per model)."""
    header = ["model", "export", "BN in→out", "sums in→out", "merged", "Conv out (timm)", "max rel", "verify",
              "inspect"]
    if any(r.latency_ms for r in rows):
        header.append("ms in→out")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.variant} | {r.error[:120]} |" + " |" * (len(header) - 3))
            continue
        cells = [r.model, r.variant, f"{r.bn[0]}→{r.bn[1]}", f"{r.sums[0]}→{r.sums[1]}", str(r.merged),
                 f"{r.convs} ({r.timm_convs if r.timm_convs is not None else '?'})", f"{r.max_rel:.1e}",
                 "PASS" if r.verified else "FAIL", "same" if r.inspect_agrees else "DIFFERS"]
        if len(header) > len(cells):
            cells.append(f"{r.latency_ms[0]:.2f}→{r.latency_ms[1]:.2f}" if r.latency_ms else "")
        lines.append("| " + " | ".join(cells) + " |")
    seen: set[tuple[str, str]] = set()
    notes = []
    for r in rows:
        for node, reason in r.refused.items():
            if (r.model, reason) not in seen:
                seen.add((r.model, reason))
                notes.append(f"- {r.model} ({r.variant}) `{node}`: {reason or 'NO REASON RECORDED'}")
    if notes:
        lines += ["", "BatchNormalization left:", *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.timm_reparam", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="timm names, NAME or NAME:SIZE (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="export variants (default: %(default)s)")
    parser.add_argument("--latency", action="store_true", help="time the export and the output (batch 1, one thread)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("timm") is None:
        print("timm is not installed: nothing to run (pip install --no-deps timm huggingface_hub safetensors pyyaml)")
        return 0
    models = {}
    for item in args.models.split(","):
        name, _, size = item.partition(":")
        models[name] = int(size) if size else DEFAULT_MODELS.get(name, 224)
    with tempfile.TemporaryDirectory(prefix="normfold-timm-") as folder:
        rows = run(models, tuple(args.variants.split(",")), Path(folder), latency=args.latency)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    failed = [r for r in rows if r.failures]
    for r in failed:
        print(f"FAIL {r.model} {r.variant}: {'; '.join(r.failures)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
