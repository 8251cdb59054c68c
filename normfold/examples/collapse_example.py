"""``normfold collapse --example NAME``: train a digits CNN, collapse it, export and verify it.

1. :mod:`normfold.examples.digits` loads the data and trains model ``NAME`` (seeded).
2. :func:`normfold.torch.collapse` collapses it with ``finetune_epochs`` of fine-tuning per step
   (distilling from the dense model with weight ``distill``), one removal per step or, with
   ``target_latency``, the removals the segment DP chooses jointly; it evaluates on the validation split, checkpointing in ``checkpoint_dir`` (a rerun resumes).
3. The result is exported to ONNX (TorchScript exporter, opset 17, symbolic batch) and run in
   onnxruntime with optimizations off against the torch model on the test split: the export's
   deviation goes into the report with the test accuracy of the dense and collapsed models.
4. The report (JSON) and a PNG plot are written beside the model: validation accuracy with the
   accuracy floor and the undone step, batch-1 onnxruntime latency as median with its
   inter-quartile range, and MACs, against the activations removed.
"""

from __future__ import annotations

__all__ = ["run"]

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from normfold import io, runtime
from normfold.errors import InputError
from normfold.files import write_atomic
from normfold.report import write_json


def run(
    name: str,
    output: str | os.PathLike,
    *,
    report_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    epochs: int = 30,
    finetune_epochs: int = 3,
    max_accuracy_drop: float = 0.01,
    max_flops_growth: float = 1.0,
    checkpoint_dir: str | os.PathLike | None = None,
    seed: int = 0,
    target_latency: float | None = None,
    distill: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the example end to end; returns the report that was written."""
    try:
        import torch
    except ImportError:
        raise InputError("--example needs torch: pip install 'normfold[examples]' torch==2.13.0") from None
    from normfold.examples import digits
    from normfold.torch import collapse

    output = Path(output)
    report_path = Path(report_path) if report_path else output.with_suffix(".json")
    plot_path = Path(plot_path) if plot_path else output.with_suffix(".png")
    for path in (output, report_path, plot_path):
        if not path.parent.is_dir():
            raise InputError(f"{path}: folder {path.parent} does not exist")
    checkpoint_dir = checkpoint_dir or output.parent / f".{output.stem}-collapse-{name}"

    data = digits.load(seed)
    model = digits.build(name, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        digits.train(model, data, epochs=epochs, seed=seed, progress=progress)
        finetune = digits.finetuner(data, epochs=finetune_epochs, distill=distill, progress=progress)
        result = collapse(
            model,
            digits.batches(data.train_x, data.train_y, 128),
            evaluate=lambda m: digits.accuracy(m, data.val_x, data.val_y),
            finetune=finetune if finetune_epochs else None,
            example_inputs=data.val_x[:8],
            max_accuracy_drop=max_accuracy_drop,
            max_flops_growth=max_flops_growth,
            checkpoint_dir=checkpoint_dir,
            seed=seed,
            target_latency=target_latency,
            progress=progress,
        )
    report = dict(result.report)
    report["example"] = {
        "model": name, "data": "scikit-learn digits (8x8, 60/20/20 train/val/test split)",
        "epochs": epochs, "finetune_epochs": finetune_epochs, "distill": distill, "seed": seed,
        "test_accuracy_dense": digits.accuracy(model, data.test_x, data.test_y),
        "test_accuracy_collapsed": digits.accuracy(result.model, data.test_x, data.test_y),
    }
    report["onnx"] = _export(result.model, data.test_x, output)
    write_json(report_path, report)
    _plot(report, plot_path, name)
    report["files"] = {"model": str(output), "report": str(report_path), "plot": str(plot_path)}
    return report


def _export(module: Any, test_x: Any, output: Path) -> dict[str, Any]:
    """Export ``module`` to ``output`` atomically and measure it in onnxruntime against torch."""
    import torch

    # Exported in the system temp folder: a kill leaves nothing next to OUT (io.save stages OUT).
    with tempfile.TemporaryDirectory(prefix="normfold-example-") as folder:
        staged = Path(folder) / output.name
        torch.onnx.export(
            module.eval(), (test_x[:2],), str(staged), dynamo=False, opset_version=17,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
        model = io.load(staged)
        io.save(model, output)
    with torch.no_grad():
        expected = module(test_x).numpy()
    got = runtime.run(output, {"input": test_x.numpy()})["logits"]
    error = float(np.abs(got - expected).max())
    return {
        "opset": 17,
        "nodes": sum(1 for _ in model.graph.all_nodes()),
        "max_abs_error_vs_torch": error,
        "max_rel_error_vs_torch": error / max(float(np.abs(expected).max()), 1e-12),
        "argmax_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
    }


def _plot(report: dict[str, Any], path: Path, name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the plot needs matplotlib: pip install 'normfold[examples]'") from None
    dense = report["dense"]
    steps = report["steps"]
    accepted = [s for s in steps if s["accepted"]]
    undone = [s for s in steps if not s["accepted"]]
    removed = [0] + [s["activations_removed"] for s in accepted]
    from matplotlib.ticker import MaxNLocator

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.6))
    for axes in (left, middle, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("activations removed")
    left.plot(removed, [dense["accuracy"]] + [s["accuracy"] for s in accepted], marker="o", label="accepted")
    if undone:
        left.plot([s["activations_removed"] for s in undone], [s["accuracy"] for s in undone], "x",
                  color="tab:red", markersize=9, label="undone (below the floor)")
    floor = dense["accuracy"] - report["settings"]["max_accuracy_drop"]
    left.axhline(floor, color="grey", linestyle=":", label=f"floor ({floor:.3f})")
    left.set_ylabel("validation accuracy")
    left.set_title(f"{name}: accuracy")
    left.legend(fontsize=8)
    timings = [dense.get("latency_merged")] + [s.get("latency") for s in accepted]
    if all(t is not None for t in timings):
        medians = [t["median_ms"] for t in timings]
        spread = [[t["median_ms"] - t["q1_ms"] for t in timings], [t["q3_ms"] - t["median_ms"] for t in timings]]
        middle.errorbar(removed, medians, yerr=spread, marker="o", capsize=3)
        middle.set_ylabel("batch-1 onnxruntime latency (ms)")
        middle.set_title("latency: median, bars = IQR")
    else:
        middle.set_title("latency not measured")
    right.plot(removed, [dense["macs_merged"] / 1e6] + [s["macs"] / 1e6 for s in accepted], marker="o")
    right.set_ylabel("MACs per sample (M)")
    right.set_title("work (BN folded, merged)")
    figure.tight_layout()
    try:
        write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))
    finally:
        plt.close(figure)
