"""TLC layer collapse against its baselines, on real data that ships or generates locally.

    python -m benchmarks.collapse [--tasks digits/resnet18,digits/vgg,mnist1d/cnn]
                                  [--methods normfold,reference,random,entropy]
                                  [--max-drop 0.03] [--json results.json] [--plot collapse.png]

Tasks: scikit-learn's digits (8×8, ships inside scikit-learn; a linear model reaches ~96%) with a
ResNet-18-style network (zoo ``BasicBlock`` × [2, 2, 2, 2]) and a VGG-style one; MNIST-1D
(``pip install mnist1d``, generated locally in seconds; nonlinearity matters there) with a
Conv1d-BN-ReLU network. Each network is trained once (seeded), then collapsed by every method
with the same fine-tuning (``--finetune-epochs`` of Adam per step) and the same stopping rule
(validation accuracy more than ``--max-drop`` below the dense model's: that step is undone).

Methods:

- ``normfold``: :func:`normfold.torch.collapse` (loss-probe ranking with cost-aware ties,
  per-channel linearize/prune, pad-first, exact merges, MACs never grow).
- ``reference``: the TLC authors' procedure as their code runs it: the same loss probe, but the
  whole activation becomes ``nn.Identity`` and nothing is merged (any site can go).
- ``random``: normfold's machinery with a random removal order.
- ``entropy``: normfold's machinery in EASIER's order (Quétu et al. 2024): lowest mean binary
  entropy of the on/off state of the activation's channels over the calibration set first.

Per accepted step it records test accuracy, activations removed, layers merged, MACs per sample,
and batch-1 CPU latency in torch and in onnxruntime (``ORT_ENABLE_ALL``, one thread; median of
many runs), then prints one table per task and a summary row per method at the last step, with
ratios to the dense model with its BatchNorms folded (what eager torch should be compared with;
onnxruntime folds them itself).
Everything runs with one thread (the numbers are per-core and the cores may be shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from normfold import runtime
from normfold.examples import digits
from normfold.models.resnet import BasicBlock
from normfold.torch import collapse
from normfold.torch.layer_collapse import calibrate, cost
from normfold.torch.layer_collapse.driver import trace
from normfold.torch.layer_collapse.graph import activation_of, channel_axis, sites
from normfold.torch.layer_collapse.rewrite import merge_layers, record_shapes, shape_of

METHODS = ("normfold", "reference", "random", "entropy")


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


TASKS: dict[str, tuple[Callable[[], digits.Digits], Callable[[], nn.Module]]] = {
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

    def rank(model: fx.GraphModule, names: list[str]) -> str:
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

        def entropy(name: str) -> float:
            p = torch.stack(on[name]).mean(0).clamp(1e-12, 1 - 1e-12)
            return float((-(p * p.log2()) - (1 - p) * (1 - p).log2()).mean())

        return min(sorted(names), key=entropy)

    rank.__name__ = "entropy"
    return rank


# ---- the authors' procedure: Identity replacement, no merge -----------------------------------

def reference_collapse(model: nn.Module, data: digits.Digits, *, finetune, max_drop: float,
                       batches: list[calibrate.Batch]) -> list[dict[str, Any]]:
    """Loss-probe the removal of each remaining activation as ``nn.Identity``; keep the best."""
    working = trace(model)
    dense_accuracy = digits.accuracy(working, data.val_x, data.val_y)
    rows = []
    while True:
        names = [node.name for node in sites(working)]
        if not names:
            break
        best, best_loss = None, math.inf
        for name in names:
            candidate = copy.deepcopy(working)
            _identity(candidate, name)
            loss = float(calibrate.probe_losses(candidate, batches, None, None).mean())
            if loss < best_loss:
                best, best_loss = candidate, loss
        step = len(rows) + 1
        _seeded_finetune(finetune, best, step)
        accuracy = digits.accuracy(best, data.val_x, data.val_y)
        if accuracy < dense_accuracy - max_drop:
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


def _seeded_finetune(finetune, model: nn.Module, step: int) -> None:
    torch.manual_seed(step)
    model.train()
    finetune(model, step)
    model.eval()


# ---- measuring ----------------------------------------------------------------------------------

def ort_latency_ms(model: nn.Module, sample: torch.Tensor, repeats: int = 300) -> float:
    """Median batch-1 latency of ``model`` exported to ONNX, in onnxruntime (ORT_ENABLE_ALL, 1 thread)."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        path = Path(folder) / "model.onnx"
        torch.onnx.export(model.eval(), (sample,), str(path), dynamo=False, opset_version=17)
        session = runtime.session(path, optimize=True, threads=1)
        feeds = {session.get_inputs()[0].name: sample.numpy()}
        for _ in range(20):
            session.run(None, feeds)
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1e3


def measure(model: nn.Module, data: digits.Digits) -> dict[str, Any]:
    sample = data.test_x[:1]
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    return {
        "test_accuracy": digits.accuracy(model, data.test_x, data.test_y),
        "macs": cost.macs(gm, (sample,)),
        "params": cost.parameters(model),
        "activations": sum(1 for n in gm.graph.nodes if activation_of(gm, n) is not None),
        "torch_ms": cost.latency_ms(model, (sample,), repeats=200, warmup=20),
        "ort_ms": ort_latency_ms(model, sample),
    }


def run_task(name: str, methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    load, build = TASKS[name]
    data = load()
    torch.manual_seed(args.seed)
    model = build()
    start = time.perf_counter()
    digits.train(model, data, epochs=args.epochs, seed=args.seed)
    result: dict[str, Any] = {"train_seconds": time.perf_counter() - start}
    dense = measure(model, data)
    dense["val_accuracy"] = digits.accuracy(model, data.val_x, data.val_y)
    result["dense"] = dense
    # Eager torch runs BatchNorm as its own op; every collapsed model has it folded. Compare
    # torch latency with the dense model folded the same way (onnxruntime folds it itself).
    result["dense_folded"] = measure(merge_layers(trace(model), (data.val_x[:8],)).module, data)
    finetune = digits.finetuner(data, epochs=args.finetune_epochs)
    calibration = digits.batches(data.train_x, data.train_y, 128)
    batches, probe = calibrate.make_batches(calibration, 512)
    for method in methods:
        start = time.perf_counter()
        if method == "reference":
            rows = reference_collapse(model, data, finetune=finetune, max_drop=args.max_drop, batches=probe)
        else:
            rank = {"normfold": "probe", "random": random_order(args.seed), "entropy": entropy_order(probe)}[method]
            outcome = collapse(
                model, calibration, evaluate=lambda m: digits.accuracy(m, data.val_x, data.val_y),
                finetune=finetune, example_inputs=data.val_x[:8], max_accuracy_drop=args.max_drop,
                rank=rank, seed=args.seed, measure_latency=False, progress=False,
            )
            rows = [{"removed": s.activations_removed, "layers_merged": s.layers_merged,
                     "val_accuracy": s.accuracy, "model": s.model} for s in outcome.history if s.accepted]
        seconds = time.perf_counter() - start
        for row in rows:
            row.update(measure(row.pop("model"), data))
        result[method] = {"seconds": seconds, "steps": rows}
    return result


def format_task(name: str, result: dict[str, Any]) -> str:
    dense = result["dense"]
    header = ("method", "removed", "merged", "test acc", "MACs", "torch ms", "ORT ms")
    rows = [header]
    for label, row in (("dense", dense), ("dense, BN folded", result["dense_folded"])):
        rows.append((label, "0", "0", f"{row['test_accuracy']:.4f}", f"{row['macs'] / 1e3:.1f}k",
                     f"{row['torch_ms']:.3f}", f"{row['ort_ms']:.3f}"))
    for method in METHODS:
        for step in result.get(method, {}).get("steps", []):
            rows.append((method, str(step["removed"]), str(step["layers_merged"]), f"{step['test_accuracy']:.4f}",
                         f"{step['macs'] / 1e3:.1f}k", f"{step['torch_ms']:.3f}", f"{step['ort_ms']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"## {name} (dense trained in {result['train_seconds']:.1f} s)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(results: dict[str, dict[str, Any]]) -> str:
    """One row per (task, method): the last accepted step against the dense model (BN folded)."""
    header = ("task", "method", "removed", "merged", "test acc drop", "MACs x", "torch x", "ORT x", "seconds")
    rows = [header]
    for task, result in results.items():
        dense = result["dense_folded"]
        for method in METHODS:
            if method not in result:
                continue
            steps = result[method]["steps"]
            last = steps[-1] if steps else {**dense, "removed": 0, "layers_merged": 0}
            rows.append((
                task, method, str(last["removed"]), str(last["layers_merged"]),
                f"{dense['test_accuracy'] - last['test_accuracy']:+.4f}",
                f"{last['macs'] / dense['macs']:.2f}", f"{last['torch_ms'] / dense['torch_ms']:.2f}",
                f"{last['ort_ms'] / dense['ort_ms']:.2f}", f"{result[method]['seconds']:.0f}",
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 6.5), squeeze=False)
    for column, (task, result) in enumerate(results.items()):
        dense = result["dense"]
        for method in METHODS:
            if method not in result:
                continue
            steps = result[method]["steps"]
            removed = [0] + [s["removed"] for s in steps]
            axes[0][column].plot(removed, [dense["test_accuracy"]] + [s["test_accuracy"] for s in steps],
                                 marker="o", label=method)
            axes[1][column].plot(removed, [dense["ort_ms"]] + [s["ort_ms"] for s in steps], marker="o", label=method)
        axes[0][column].set_title(task)
        axes[0][column].set_ylabel("test accuracy")
        axes[1][column].set_ylabel("batch-1 ORT latency (ms)")
        axes[1][column].set_xlabel("activations removed")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collapse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the dense model")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs per step")
    parser.add_argument("--max-drop", type=float, default=0.03, help="validation accuracy drop that stops a run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--plot", help="write the accuracy/latency plot here (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    results = {}
    for task in [t for t in args.tasks.split(",") if t]:
        results[task] = run_task(task, methods, args)
        print(format_task(task, results[task]), flush=True)
        print(flush=True)
    print(format_summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
