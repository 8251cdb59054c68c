"""TLC layer collapse against its baselines, on real data that ships or generates locally.

    nice python -m benchmarks.collapse [--tasks digits32/resnet18,digits32/mobilenet_v2]
                                       [--methods normfold,depthshrinker,reference,random,entropy]
                                       [--seeds 0,1,2] [--json results.json] [--plot collapse.png]
    python -m benchmarks.collapse --summarize seed0.json,seed1.json [--plot collapse.png]

Tasks: scikit-learn's digits (ships inside scikit-learn), upsampled to 32×32 and three channels,
with **torchvision's own** ``resnet18`` and ``mobilenet_v2`` classes (``num_classes=10``;
``pip install 'normfold[bench]'``; the bench helper :func:`torchvision_models` makes the CPU
torch load the registry's CUDA wheel, see TRAPS.md); the older ``digits/resnet18`` (zoo
BasicBlocks for 8×8), ``digits/vgg`` and ``mnist1d/cnn`` (``pip install mnist1d``) remain. Each
network is trained per seed (``--epochs`` of Adam), then collapsed by every method with the same
fine-tuning (``--finetune-epochs`` per step, logit distillation from the dense model with weight
``--distill``), evaluating on the validation split; test accuracy is reported once per step.

Methods:

- ``normfold``: :func:`normfold.torch.collapse` with ``target_latency`` and ``prune`` per task
  (``SETTINGS``; ``--target-latency`` and ``--prune`` override): segment candidates (whole
  inverted residuals, residual blocks, branch pruning), measured segment latency, the segment
  DP fitted on the whole model, exact merges.
- ``depthshrinker``: DepthShrinker's fixed choice (Fu et al., ICML 2022): every in-block
  activation of every block (both of each inverted residual; a BasicBlock's inner ReLU)
  becomes the identity at once, the blocks merge exactly, one fine-tune of the same total length.
- ``reference``: the TLC authors' procedure as their code runs it: the loss probe picks one
  activation per step, it becomes ``nn.Identity``, nothing is merged.
- ``random`` / ``entropy``: normfold's candidates and merges, one removal per step, in a random
  order or EASIER's order (Quétu et al. 2024: lowest mean binary entropy of the channels' on/off
  state first); ``--max-steps`` bounds these step-wise methods and normfold's joint steps.

Per step: test accuracy, activations removed, layers merged, MACs per sample, batch-1
onnxruntime CPU latency (``ORT_ENABLE_ALL``, one thread) as the median of ``--repeats`` rounds
with their inter-quartile range, the blocks reduced to one conv or none (:func:`block_counts`),
the ONNX export checked against the module (:func:`onnx_check`) and the merges' largest
relative float64 error. The summary gives, per task and method, the onnxruntime
speed-up over the BN-folded dense model (timed round for round in turn with each step's model,
so both see the same load) at the fastest step whose test accuracy is at most
``--max-drop-points`` (default 1) below the dense model's, over the seeds: median and range.
Everything runs on one thread; on a shared machine the latencies are noisy (the IQR says how much).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from benchmarks import torchvision_schemas
from normfold import runtime
from normfold.examples import digits
from normfold.models.resnet import BasicBlock
from normfold.torch import collapse
from normfold.torch.layer_collapse import calibrate, cost, driver
from normfold.torch.layer_collapse.driver import trace
from normfold.torch.layer_collapse.graph import (
    activation_of, channel_axis, is_add, is_conv, padding_of, readers_of, sites, source_of,
)
from normfold.torch.layer_collapse.rewrite import layer_count, merge_layers, record_shapes, shape_of

METHODS = ("normfold", "depthshrinker", "reference", "random", "entropy")
# normfold's settings per task: the latency budget (a ratio to the BN-folded dense model) and
# whether residual branches may be pruned. Issue 12 asks for ResNet-18 at <= 0.80x with >= 3 of 8
# BasicBlocks reduced to one conv or none (pruning counts), and for MobileNetV2 at <= 0.85x with
# >= 8 of its 16 expansion blocks merged into one conv (pruning does not count: merges only).
# The budgets sit below those ceilings: the timing noise of a whole model (up to 6% between two
# sessions on a shared machine) must not decide, and the block counts follow from the budget,
# so it must need more blocks than the minimum even when the blocks that save the most
# are chosen (measured on seed 0: ResNet-18's two largest removals save 29% of its latency, so
# 0.70 could be met with two blocks; MobileNetV2's eight cheapest merges save 47%).
SETTINGS: dict[str, dict[str, Any]] = {
    "digits32/resnet18": {"target_latency": 0.60, "prune": True},
    "digits32/mobilenet_v2": {"target_latency": 0.50, "prune": False},
}


# ---- data and models ------------------------------------------------------------------------

def mnist1d(seed: int = 0) -> digits.Digits:
    """MNIST-1D (default arguments), train split 80/20 into train/validation, standardized."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    data = make_dataset(args)
    x, y = np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, val = order[:cut], order[cut:]
    mean, std = x[train].mean(), x[train].std()

    def images(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((array - mean) / std, dtype=torch.float32).unsqueeze(1)

    def labels(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.int64)

    test_x, test_y = np.asarray(data["x_test"], dtype=np.float64), np.asarray(data["y_test"])
    return digits.Digits(images(x[train]), labels(y[train]), images(x[val]), labels(y[val]),
                         images(test_x), labels(test_y))


class ResNet18Style(nn.Module):
    """torchvision's ResNet-18 layout ([2, 2, 2, 2] BasicBlocks) for 8×8 single-channel images."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        blocks, planes = [], width
        for stage in range(4):
            out = width * 2**stage
            blocks += [BasicBlock(planes, out, stride=1 if stage == 0 else 2), BasicBlock(out, out)]
            planes = out
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Conv1dNet(nn.Module):
    """Conv1d-BN-ReLU ×4 (two with stride 2), global average pool, Linear: ~94% on MNIST-1D."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
            return [nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                    nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, width, 5, 1), *block(width, width, 5, 2), *block(width, 2 * width, 5, 2),
            *block(2 * width, 2 * width, 3, 1),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def digits32(seed: int = 0) -> digits.Digits:
    """scikit-learn's digits upsampled (bilinear) to 32×32 and repeated over three channels."""
    data = digits.load(seed)

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    return digits.Digits(up(data.train_x), data.train_y, up(data.val_x), data.val_y, up(data.test_x), data.test_y)


def torchvision_models() -> Any:
    """``torchvision.models`` with the CPU torch: the registry's only torchvision wheel is a CUDA
    build whose ``_C`` ops do not load, but importing it needs the op schemas it registers fake
    kernels for; define them first (a bench helper, never in the library; see TRAPS.md)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        raise SystemExit("the torchvision tasks need torchvision: pip install 'normfold[bench]'")
    torchvision_schemas.define()
    import torchvision

    return torchvision.models


TASKS: dict[str, tuple[Callable[[int], digits.Digits], Callable[[], nn.Module]]] = {
    "digits32/resnet18": (digits32, lambda: torchvision_models().resnet18(num_classes=10)),
    "digits32/mobilenet_v2": (digits32, lambda: torchvision_models().mobilenet_v2(num_classes=10)),
    "digits/resnet18": (digits.load, ResNet18Style),
    "digits/vgg": (digits.load, digits.DigitsVGG),
    "mnist1d/cnn": (mnist1d, Conv1dNet),
}


# ---- rankers for normfold's machinery ---------------------------------------------------------

def random_order(seed: int) -> Callable[[fx.GraphModule, list[str]], str]:
    rng = random.Random(seed)

    def rank(model: fx.GraphModule, names: list[str]) -> str:
        return rng.choice(sorted(names))

    rank.__name__ = "random"
    return rank


def entropy_order(batches: list[calibrate.Batch]) -> Callable[[fx.GraphModule, list[str]], str]:
    """EASIER's order: the site whose channels' on/off states have the lowest mean entropy."""

    def rank(model: fx.GraphModule, labels: list[str]) -> str:
        # Candidates are runs of sites joined by "+" (EASIER scores one site; a run scores the
        # mean of its sites) or branch prunings, which EASIER has no score for: never first.
        names = {name for label in labels if not label.startswith("prune ") for name in label.split("+")}
        record_shapes(model, batches[0].inputs)
        axes = {n: channel_axis(model, node, len(shape_of(node.args[0])))
                for n, node in ((n.name, n) for n in model.graph.nodes) if n in names}
        on: dict[str, list[torch.Tensor]] = {}

        class _Counter(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n.name in axes:
                    x = self.fetch_args_kwargs_from_env(n)[0][0]
                    dims = [d for d in range(x.dim()) if d != axes[n.name]]
                    on.setdefault(n.name, []).append((x > 0).double().mean(dims))
                return super().run_node(n)

        with torch.no_grad():
            for batch in batches:
                _Counter(model.eval()).run(*batch.inputs)

        def entropy(label: str) -> float:
            if label.startswith("prune "):
                return float("inf")
            values = []
            for name in label.split("+"):
                p = torch.stack(on[name]).mean(0).clamp(1e-12, 1 - 1e-12)
                values.append(float((-(p * p.log2()) - (1 - p) * (1 - p).log2()).mean()))
            return float(np.mean(values))

        return min(sorted(labels), key=entropy)

    rank.__name__ = "entropy"
    return rank


# ---- the authors' procedure: Identity replacement, no merge -----------------------------------

def reference_collapse(model: nn.Module, data: digits.Digits, *, finetune, floor: float,
                       batches: list[calibrate.Batch], max_steps: int) -> list[dict[str, Any]]:
    """Loss-probe the removal of each remaining activation as ``nn.Identity``; keep the best."""
    working = trace(model)
    rows: list[dict[str, Any]] = []
    while len(rows) < max_steps:
        names = [node.name for node in sites(working)]
        if not names:
            break
        best, best_loss = None, float("inf")
        for name in names:
            candidate = copy.deepcopy(working)
            _identity(candidate, name)
            loss = float(calibrate.probe_losses(candidate, batches, None, None).mean())
            if loss < best_loss:
                best, best_loss = candidate, loss
        step = len(rows) + 1
        _seeded_finetune(finetune, best, step)
        accuracy = digits.accuracy(best, data.val_x, data.val_y)
        if accuracy < floor:
            break
        working = best
        rows.append({"removed": step, "layers_merged": 0, "val_accuracy": accuracy, "model": copy.deepcopy(best)})
    return rows


def _identity(gm: fx.GraphModule, name: str) -> None:
    node = next(n for n in gm.graph.nodes if n.name == name)
    target = f"identity_{name}"
    gm.add_submodule(target, nn.Identity())
    node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}
    gm.recompile()


def _seeded_finetune(finetune, model: nn.Module, step: int, teacher: nn.Module | None = None) -> None:
    torch.manual_seed(step)
    model.train()
    finetune(model, step, teacher=teacher)
    model.eval()


# ---- DepthShrinker's fixed choice ----------------------------------------------------------------

def depthshrinker(model: nn.Module, data: digits.Digits, *, finetune) -> list[dict[str, Any]]:
    """Every in-block activation becomes the identity at once; the blocks merge exactly; one fine-tune.

    In-block: an activation called inside an ``InvertedResidual`` or ``BasicBlock`` module (by
    class name: torchvision's and the zoo's) whose input is not the block's residual sum, i.e.
    both of an inverted residual's and a BasicBlock's inner one; the stem and the after-Add stay.
    """
    working = trace(model)
    record_shapes(working, (data.val_x[:1],))
    blocks = [name + "." for name, module in model.named_modules()
              if type(module).__name__ in ("InvertedResidual", "BasicBlock")]
    chosen = [node.name for node in sites(working)
              if node.op == "call_module" and any(node.target.startswith(b) for b in blocks)
              and not is_add(source_of(working, node.args[0]))]
    edits: list[dict[str, Any]] = []
    like = next(working.parameters())
    for name in chosen:
        node = next(n for n in working.graph.nodes if n.name == name)
        channels = shape_of(node.args[0])[channel_axis(working, node, len(shape_of(node.args[0])))]
        edits.append({"op": "linearize", "site": name, "slope": torch.ones(channels, dtype=torch.float64),
                      "offset": torch.zeros(channels, dtype=torch.float64), "axis": 1})
    shrunk = driver._edited(working, edits, like)
    for name in chosen:  # pad-first: the padded reader inside a block then merges exactly
        readers = readers_of(shrunk, next(n for n in shrunk.graph.nodes if n.name == name))
        if len(readers) == 1 and is_conv(shrunk, readers[0]) and any(padding_of(shrunk.get_submodule(readers[0].target))):
            driver._apply(shrunk, {"op": "pad_first", "conv": readers[0].name}, like)
    _seeded_finetune(finetune, shrunk, 1, teacher=trace(model))
    free = [n.name for n in shrunk.graph.nodes]
    merged = merge_layers(shrunk, (data.val_x[:8],), free=free)
    return [{"removed": len(chosen), "layers_merged": layer_count(working) - layer_count(merged.module),
             "val_accuracy": digits.accuracy(merged.module, data.val_x, data.val_y), "model": merged.module,
             "merges": [m.to_dict() for m in merged.merges]}]


# ---- measuring ----------------------------------------------------------------------------------

def measure(model: nn.Module, data: digits.Digits, repeats: int, reference: nn.Module | None = None) -> dict[str, Any]:
    """Test accuracy, MACs, parameters, activations and ORT latency; with ``reference`` (the
    BN-folded dense model) also its latency, the rounds of both taken in turn (``ort_dense``)."""
    sample = data.test_x[:1]
    gm = trace(model)
    timings = cost.ort_latencies([gm] if reference is None else [gm, reference], (sample,), runs=100, repeats=repeats)
    row = {
        "test_accuracy": digits.accuracy(model, data.test_x, data.test_y),
        "macs": cost.macs(gm, (sample,)),
        "params": cost.parameters(model),
        "activations": sum(1 for n in gm.graph.nodes if activation_of(gm, n) is not None),
        "ort": timings[0].to_dict(),
    }
    if reference is not None:
        row["ort_dense"] = timings[1].to_dict()
    return row


def block_counts(dense: nn.Module, final: nn.Module, merges: list[dict[str, Any]]) -> dict[str, int]:
    """How many of the dense model's blocks the final model computes with one conv, or none.

    Blocks: torchvision's ``BasicBlock`` (and the zoo's) and MobileNetV2's ``InvertedResidual``
    with an expansion conv (``expansion_blocks``; the one with expand ratio 1 is not counted).
    A final conv stands for every dense conv merged into it (``merges``: the last step's
    merges, from the unmerged model to the final one); a block is ``one_conv`` when exactly one
    final conv holds its convs, ``none`` when none does (its branch was pruned).
    """
    origins: dict[str, set[str]] = {}
    for merge in merges:
        origins[merge["into"]] = set().union(origins.get(merge["into"], {merge["into"]}),
                                             *(origins.get(r, {r}) for r in merge["removed"]))
    gm, traced = trace(final), trace(dense)
    finals = [origins.get(n.name, {n.name}) for n in gm.graph.nodes if is_conv(gm, n)]
    counts = {"blocks": 0, "one_conv": 0, "none": 0}
    for name, module in dense.named_modules():
        kind = type(module).__name__
        if kind not in ("BasicBlock", "InvertedResidual"):
            continue
        convs = {n.name for n in traced.graph.nodes if is_conv(traced, n) and n.target.startswith(name + ".")}
        if kind == "InvertedResidual" and len(convs) < 3:
            continue  # expand ratio 1 (depthwise, projection): not one of the expansion blocks
        holders = sum(1 for origin in finals if origin & convs)
        counts["blocks"] += 1
        counts["one_conv"] += holders == 1
        counts["none"] += holders == 0
    return counts


def onnx_check(module: nn.Module, data: digits.Digits) -> dict[str, float]:
    """``module`` exported to ONNX (TorchScript exporter) against itself, in onnxruntime with
    optimizations off, on eight test samples: max |difference|, relative to max |output|."""
    x = data.test_x[:8]
    model = cost.onnx_of(trace(module), (x,))
    with torch.no_grad():
        expected = module.eval()(x).numpy()
    got = runtime.run(model, {model.graph.input[0].name: x.numpy()})
    output = next(iter(got.values()))
    return {"max_abs": float(np.abs(output - expected).max()),
            "max_rel": float(np.abs(output - expected).max() / np.abs(expected).max()),
            "argmax_agreement": float((output.argmax(1) == expected.argmax(1)).mean())}


def run_seed(name: str, seed: int, methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    load, build = TASKS[name]
    data = load(seed)
    torch.manual_seed(seed)
    model = build()
    start = time.perf_counter()
    cached = Path(args.cache) / f"{name.replace('/', '-')}-seed{seed}-e{args.epochs}-lr{args.lr:g}.pt" if args.cache else None
    if cached is not None and cached.exists():  # a dense model trained by an earlier run, same settings
        model.load_state_dict(torch.load(cached, weights_only=True))
    else:
        digits.train(model, data, epochs=args.epochs, lr=args.lr, seed=seed)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cached)
    model.eval()
    result: dict[str, Any] = {"train_seconds": time.perf_counter() - start}
    dense = measure(model, data, args.repeats)
    dense["val_accuracy"] = digits.accuracy(model, data.val_x, data.val_y)
    result["dense"] = dense
    # Every collapsed model has its BatchNorms folded: compare with the dense model folded the same way.
    folded = merge_layers(trace(model), (data.val_x[:8],)).module
    result["dense_folded"] = measure(folded, data, args.repeats)
    finetune = digits.finetuner(data, epochs=args.finetune_epochs, distill=args.distill)
    calibration = digits.batches(data.train_x, data.train_y, 128)
    batches, probe = calibrate.make_batches(calibration, args.probe_samples)
    floor = dense["val_accuracy"] - args.max_drop
    for method in methods:
        start = time.perf_counter()
        stop: dict[str, Any] = {}  # why a collapse run ended, and the steps it undid
        if method == "reference":
            rows = reference_collapse(model, data, finetune=finetune, floor=floor, batches=probe,
                                      max_steps=args.max_steps)
        elif method == "depthshrinker":
            rows = depthshrinker(model, data, finetune=digits.finetuner(
                data, epochs=args.finetune_epochs * 2, distill=args.distill))
        else:
            settings: dict[str, Any] = dict(rank="probe", max_steps=args.max_steps)
            if method == "normfold":
                settings = {"target_latency": 0.8, "prune": True, **SETTINGS.get(name, {}), "max_steps": args.max_steps}
                if args.target_latency:
                    settings["target_latency"] = args.target_latency
                if args.prune != "task":
                    settings["prune"] = args.prune == "on"
            elif method == "random":
                settings["rank"] = random_order(seed)
            elif method == "entropy":
                settings["rank"] = entropy_order(probe)
            outcome = collapse(
                model, calibration, evaluate=lambda m: digits.correct(m, data.val_x, data.val_y),
                finetune=finetune, example_inputs=data.val_x[:8], max_accuracy_drop=args.max_drop,
                seed=seed, probe_samples=args.probe_samples, latency_runs=20, latency_repeats=3,
                measure_latency=method == "normfold", recovery_rounds=args.recovery_rounds, progress=False,
                **settings,
            )
            rows = [{"removed": s.activations_removed, "layers_merged": s.layers_merged,
                     "val_accuracy": s.accuracy, "model": s.model, "candidates": s.candidates,
                     "merges": s.merges, "fit": s.fit}
                    for s in outcome.history if s.accepted]
            stop = {"stopped": outcome.report["stopped"],
                    "undone": [{"candidates": s.candidates, "val_accuracy": s.accuracy}
                               for s in outcome.history if not s.accepted]}
        seconds = time.perf_counter() - start
        for row in rows:
            model_row = row.pop("model")
            row.update(measure(model_row, data, args.repeats, reference=folded))
            row["blocks"] = block_counts(model, model_row, row.get("merges", []))
            row["onnx_check"] = onnx_check(model_row, data)
            row["max_merge_error"] = max((m.get("relative_error", 0.0) for m in row.get("merges", [])), default=0.0)
        result[method] = {"seconds": seconds, "steps": rows, **stop}
        ended = f" ({stop['stopped']}; {len(stop['undone'])} undone)" if stop else ""
        print(f"  {name} seed {seed} {method}: {len(rows)} step(s), {seconds:.0f} s{ended}", flush=True)
    return result


def best_within(result: dict[str, Any], method: str, points: float) -> dict[str, Any] | None:
    """The fastest step (median ORT latency) within ``points`` of the dense test accuracy."""
    dense = result["dense"]["test_accuracy"]
    steps = [s for s in result.get(method, {}).get("steps", []) if dense - s["test_accuracy"] <= points / 100]
    return min(steps, key=lambda s: s["ort"]["median_ms"], default=None)


def format_seed(name: str, seed: int, result: dict[str, Any]) -> str:
    header = ("method", "removed", "merged", "test acc", "MACs", "ORT ms (IQR)", "blocks 1 conv/none",
              "ONNX rel err", "merge err")
    rows = [header]

    def ort(row: dict[str, Any]) -> str:
        return f"{row['ort']['median_ms']:.3f} ({row['ort']['iqr_ms']:.3f})"

    for label, row in (("dense", result["dense"]), ("dense, BN folded", result["dense_folded"])):
        rows.append((label, "0", "0", f"{row['test_accuracy']:.4f}", f"{row['macs'] / 1e6:.2f}M", ort(row),
                     "", "", ""))
    for method in METHODS:
        for step in result.get(method, {}).get("steps", []):
            blocks = step.get("blocks")
            rows.append((method, str(step["removed"]), str(step["layers_merged"]), f"{step['test_accuracy']:.4f}",
                         f"{step['macs'] / 1e6:.2f}M", ort(step),
                         f"{blocks['one_conv']}/{blocks['none']} of {blocks['blocks']}" if blocks else "",
                         f"{step['onnx_check']['max_rel']:.1e}" if "onnx_check" in step else "",
                         f"{step['max_merge_error']:.1e}" if "max_merge_error" in step else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"## {name}, seed {seed} (dense trained in {result['train_seconds']:.0f} s)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    lines.append("speed-up per step: " + ", ".join(
        f"{method} {step['ort_dense']['median_ms'] / step['ort']['median_ms']:.2f}x"
        for method in METHODS for step in result.get(method, {}).get("steps", []) if "ort_dense" in step))
    return "\n".join(lines)


def format_summary(results: dict[str, dict[int, dict[str, Any]]], points: float) -> str:
    """Per (task, method), over seeds: the speed-up at <= ``points`` accuracy drop, median [min, max]."""
    header = ("task", "method", "seeds", f"ORT speed-up at <={points:g} pt drop", "test acc drop", "MACs x",
              "removed", "blocks one conv", "blocks none", "ONNX rel err (max)", "seconds")
    rows = [header]
    for task, by_seed in results.items():
        for method in METHODS:
            ran = [r for r in by_seed.values() if method in r]  # a method may run on some seeds only
            if not ran:
                continue
            speedups, drops, macs, removed, seconds, one_conv, none, onnx = [], [], [], [], [], [], [], []
            for result in ran:
                dense = result[method].get("dense_folded", result["dense_folded"])
                best = best_within(result, method, points) or {**dense, "removed": 0}
                # Against the dense model timed in turn with this step when it was (same load).
                speedups.append(best.get("ort_dense", dense["ort"])["median_ms"] / best["ort"]["median_ms"])
                drops.append(100 * (result["dense"]["test_accuracy"] - best["test_accuracy"]))
                macs.append(best["macs"] / dense["macs"])
                removed.append(best["removed"])
                seconds.append(result[method]["seconds"])
                blocks = best.get("blocks") or {"one_conv": 0, "none": 0}
                one_conv.append(blocks["one_conv"])
                none.append(blocks["none"])
                if "onnx_check" in best:
                    onnx.append(best["onnx_check"]["max_rel"])
            rows.append((task, method, str(len(ran)), _spread(speedups, "x"), _spread(drops, " pt"),
                         _spread(macs, ""), _spread(removed, ""), _counts(one_conv), _counts(none),
                         f"{max(onnx):.1e}" if onnx else "-", f"{statistics.median(seconds):.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _counts(values: list[int]) -> str:
    """Block counts, one per seed."""
    return ",".join(str(v) for v in values)


def _spread(values: list[float], unit: str) -> str:
    """``median [min, max]`` over seeds."""
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.median(values):.2f}{unit} [{min(values):.2f}, {max(values):.2f}]"


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """Per task: test accuracy against ORT latency (median, IQR bars) of every step, every method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    colours = dict(zip(METHODS, ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown")))
    for column, (task, by_seed) in enumerate(results.items()):
        ax = axes[0][column]
        for seed, result in by_seed.items():
            dense = result["dense_folded"]
            ax.errorbar([dense["ort"]["median_ms"]], [result["dense"]["test_accuracy"]],
                        xerr=[[dense["ort"]["median_ms"] - dense["ort"]["q1_ms"]],
                              [dense["ort"]["q3_ms"] - dense["ort"]["median_ms"]]],
                        marker="*", color="black", label="dense (BN folded)" if seed == min(by_seed) else None)
            floor = result["dense"]["test_accuracy"] - 0.01
            ax.axhline(floor, color="grey", linestyle=":", linewidth=0.8)
            for method in METHODS:
                steps = result.get(method, {}).get("steps", [])
                if not steps:
                    continue
                ax.errorbar([s["ort"]["median_ms"] for s in steps], [s["test_accuracy"] for s in steps],
                            xerr=[[s["ort"]["median_ms"] - s["ort"]["q1_ms"] for s in steps],
                                  [s["ort"]["q3_ms"] - s["ort"]["median_ms"] for s in steps]],
                            marker="o", linestyle="-", color=colours[method], alpha=0.8,
                            label=method if seed == min(by_seed) else None)
        ax.set_title(f"{task} (dotted: 1-point floor)")
        ax.set_xlabel("batch-1 onnxruntime latency (ms; bars = IQR)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collapse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits32/resnet18,digits32/mobilenet_v2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the dense model")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs per step")
    parser.add_argument("--distill", type=float, default=0.5, help="logit-distillation weight in fine-tuning")
    parser.add_argument("--recovery-rounds", type=int, default=2,
                        help="more fine-tunes of a step below the floor before it is undone (normfold, random, entropy)")
    parser.add_argument("--target-latency", type=float, help="normfold's budget (default: per task, SETTINGS)")
    parser.add_argument("--prune", choices=("task", "on", "off"), default="task",
                        help="normfold's branch pruning (default: per task, SETTINGS)")
    parser.add_argument("--max-drop", type=float, default=0.01, help="validation accuracy drop that stops a run")
    parser.add_argument("--max-drop-points", type=float, default=1.0, help="test accuracy drop for the summary")
    parser.add_argument("--max-steps", type=int, default=5, help="bound on the accepted steps of normfold and the step-wise methods")
    parser.add_argument("--probe-samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="latency rounds per model (median, IQR)")
    parser.add_argument("--cache", help="keep the trained dense models here and reuse them (same task, seed, epochs, lr)")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--plot", help="write the accuracy/latency plot here (PNG)")
    parser.add_argument("--summarize", metavar="R.json,...",
                        help="run nothing: print the summary (and --plot) of earlier --json files, e.g. one per seed")
    args = parser.parse_args(argv)
    if args.summarize:
        results = _merged([Path(p) for p in args.summarize.split(",") if p])
        print(format_summary(results, args.max_drop_points))
        if args.plot:
            plot(results, Path(args.plot))
        return 0
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    results = {}
    for task in [t for t in args.tasks.split(",") if t]:
        results[task] = {}
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            results[task][seed] = run_seed(task, seed, methods, args)
            print(format_seed(task, seed, results[task][seed]), flush=True)
            print(flush=True)
    print(format_summary(results, args.max_drop_points))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.plot:
        plot(results, Path(args.plot))
    return 0


def _merged(paths: list[Path]) -> dict[str, dict[int, dict[str, Any]]]:
    """The results of several ``--json`` files, by task and seed."""
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for path in paths:
        for task, by_seed in json.loads(path.read_text()).items():
            for seed, result in by_seed.items():
                # Methods of one seed run separately: each keeps the dense timing of its own run.
                for method in METHODS:
                    if method in result:
                        result[method].setdefault("dense_folded", result["dense_folded"])
                results.setdefault(task, {}).setdefault(int(seed), {}).update(result)
    return results


if __name__ == "__main__":
    raise SystemExit(main())
