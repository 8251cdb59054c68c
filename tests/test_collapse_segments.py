"""Segment candidates of layer collapse: whole inverted residuals and residual blocks merge into one
conv exactly (float64, pad-first included), branch pruning, the segment DP end to end, the
distillation hook, and the ONNX export of ``result.model`` with both torch exporters."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import fx, nn

from normfold import runtime
from normfold.models.resnet import BasicBlock
from normfold.torch import collapse
from normfold.torch.layer_collapse import driver, segments
from normfold.torch.layer_collapse.graph import is_conv, pad_first, sites
from normfold.torch.layer_collapse.rewrite import layer_count, merge_layers, record_shapes
from tests.test_collapse_graph import _linearize_all, _traced

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class InvertedResidual(nn.Module):
    """MobileNetV2's block as torchvision writes it (expansion ``t``; no expansion conv when t = 1)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, t: int = 6) -> None:
        super().__init__()
        hidden = cin * t
        layers: list[nn.Module] = []
        if t != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def _merged_segment(module: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Every site linearized (random per-channel maps), paddings moved first; (unmerged, merged)."""
    gm = _traced(module)
    record_shapes(gm, (x,))
    region = [n.name for n in segments.segment(gm, [s.name for s in sites(gm)])]
    gm = _linearize_all(gm, x)
    for node in list(gm.graph.nodes):
        if is_conv(gm, node) and any(gm.get_submodule(node.target).padding) and node.name != region[0]:
            pad_first(gm, node)
    return gm, merge_layers(gm, (x,), free=region).module


@pytest.mark.parametrize(
    ("block", "size"),
    [
        (InvertedResidual(8, 8), 9),
        (InvertedResidual(8, 16, stride=2), 10),
        (InvertedResidual(8, 8, t=1), 7),
        (BasicBlock(8, 8), 9),
        (BasicBlock(8, 16, stride=2), 10),
    ],
    ids=["mbv2-residual", "mbv2-stride2", "mbv2-t1", "basic-identity", "basic-projection"],
)
def test_a_whole_block_merges_into_one_conv_exactly(block, size):
    x = torch.randn(2, 8, size, size, dtype=torch.float64)
    if isinstance(block, BasicBlock):  # its after-Add ReLU stays: merge the block up to the Add
        block.relu2 = nn.Identity()
    gm, merged = _merged_segment(block, x)
    assert layer_count(merged) == 1
    with torch.no_grad():
        expected = gm(x)
        error = float((merged(x) - expected).abs().max() / expected.abs().max())
    assert error <= 1e-10


def _small_mbv2() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        InvertedResidual(8, 8), InvertedResidual(8, 16, stride=2), InvertedResidual(16, 16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # mostly-on channels, as a trained network has
            module.running_mean.uniform_(-1, 1)
            module.bias.data.uniform_(0.0, 1.0)
    return model.eval()


def _run(model: nn.Module, **settings):
    x = torch.randn(32, 1, 12, 12)
    settings.setdefault("measure_latency", False)
    with torch.random.fork_rng(devices=[]):
        return collapse(model, [x[:16], x[16:]], evaluate=lambda m: 1.0, example_inputs=x[:4], progress=False,
                        **settings)


def test_inverted_residuals_merge_as_whole_blocks_where_single_sites_are_refused():
    offered = []

    def third_block(model, labels):
        offered.extend(labels)
        return next(label for label in labels if label.startswith("_5_") and "+" in label)

    result = _run(_small_mbv2(), max_steps=1, rank=third_block, prune=False)
    (step,) = result.history
    assert step.sites == ["_5_conv_2", "_5_conv_5"]  # both activations of one block, one candidate
    assert "_5_conv_2" not in offered and "_5_conv_5" not in offered
    refusals = {r["node"]: r["reason"] for r in step.refused}
    assert "segment's final merged form would grow the work" in refusals["_5_conv_2"]
    merged = [m for m in step.merges if m["kind"] != "fold"]
    # pw∘dw, then ∘pw, then the residual into the centre tap (the classifier follows the block here)
    assert [m["kind"] for m in merged][:3] == ["conv-conv", "conv-conv", "shortcut"]
    assert step.layers_merged == 3 and all(m["max_error"] <= 1e-9 for m in step.merges)


def test_the_segment_dp_meets_a_mac_budget_in_one_joint_step():
    model = _small_mbv2()
    result = _run(model, target_latency=0.5, prune=False)
    dense = result.report["dense"]["macs_merged"]
    accepted = [s for s in result.history if s.accepted]
    assert result.report["stopped"] == "target latency reached"
    assert accepted[-1].macs <= 0.5 * dense
    assert len(accepted[0].candidates) >= 2  # several removals chosen jointly


def test_latency_is_reported_as_median_with_spread():
    result = _run(_small_mbv2(), max_steps=1, measure_latency=True, latency_runs=5, latency_repeats=3)
    for timing in (result.report["dense"]["latency_merged"], result.report["steps"][0]["latency"]):
        assert timing["rounds"] == 3 and timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"]
        assert timing["iqr_ms"] == pytest.approx(timing["q3_ms"] - timing["q1_ms"])


def test_pruning_a_residual_branch_leaves_the_shortcut_plus_its_mean():
    block = BasicBlock(4, 4).double().eval()
    gm = driver.trace(block)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    add = next(n for n in gm.graph.nodes if n.name == "add")
    branch, shortcut = add.args
    assert driver._exclusive(branch, add) and not driver._exclusive(shortcut, add)
    offset = torch.linspace(-1, 1, 4, dtype=torch.float64)
    pruned = driver._edited(gm, [{"op": "prune", "add": "add", "keep": shortcut.name, "offset": offset}], offset)
    torch.testing.assert_close(pruned(x), torch.relu(x + offset.view(1, -1, 1, 1)), rtol=0, atol=1e-12)
    assert layer_count(pruned) == 0


def test_a_finetune_callback_with_a_teacher_parameter_receives_the_dense_model():
    model = _small_mbv2()
    seen = []

    def finetune(module, step, teacher):
        x = torch.randn(2, 1, 12, 12)
        with torch.no_grad():
            seen.append(torch.equal(teacher(x), model(x)))

    _run(model, max_steps=1, finetune=finetune)
    assert seen == [True]


def test_result_model_exports_with_both_exporters_and_dynamic_batch(tmp_path):
    result = _run(_small_mbv2(), max_steps=1)
    module = result.model
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        expected = module(x).numpy()
    path = tmp_path / "torchscript.onnx"
    torch.onnx.export(module, (x[:1],), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    got = runtime.run(path, {"x": x.numpy()})["y"]  # onnxruntime, optimizations off
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    path = tmp_path / "dynamo.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                      dynamic_shapes=(({0: batch},),))  # forward(*inputs): one group of inputs
    got = runtime.run(path, {"x": x[:2].numpy()})["y"]
    np.testing.assert_allclose(got, expected[:2], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_torchvision_blocks_merge_into_one_conv_each_exactly(name):
    if importlib.util.find_spec("torchvision") is None:  # importing it needs the schemas defined first
        pytest.skip("needs torchvision (the bench extra)")
    from benchmarks.collapse import torchvision_models

    model = {"mobilenet_v2": lambda: torchvision_models().mobilenet_v2(num_classes=10, width_mult=0.25),
             "resnet18": lambda: torchvision_models().resnet18(num_classes=10)}[name]()
    blocks = [m for m in model.modules() if type(m).__name__ in ("InvertedResidual", "BasicBlock")]
    for block in blocks[:4]:  # the first blocks of each kind: residual and stride-2 ones
        size = 32 if name == "mobilenet_v2" else 8
        inputs = torch.randn(2, block.conv[0][0].in_channels if name == "mobilenet_v2" else block.conv1.in_channels,
                             size, size, dtype=torch.float64)
        if name == "resnet18":  # the after-Add ReLU stays: merge the block up to the Add
            block = _UpToAdd(block)
        gm, merged = _merged_segment(block, inputs)
        assert layer_count(merged) == 1, type(block).__name__
        with torch.no_grad():
            expected = gm(inputs)
            assert float((merged(inputs) - expected).abs().max() / expected.abs().max()) <= 1e-10


class _UpToAdd(nn.Module):
    """torchvision's BasicBlock without its final ReLU (the block's inner ReLU is the site)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        shortcut = x if b.downsample is None else b.downsample(x)
        return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))) + shortcut


@pytest.mark.parametrize(("segment_factor", "target"), [(2.0, 0.8), (0.5, 0.9)],
                         ids=["segments-overstate-widen", "segments-understate-trim"])
def test_the_joint_choice_is_fitted_to_the_budget_on_the_whole_model(monkeypatch, segment_factor, target):
    # "Latency" is MACs here, deterministic; a segment's costs segment_factor x what they are in
    # the whole model, so the summed segment savings misstate the model's and the fit must widen
    # the DP's choice (overstated) or trim it (understated).
    from normfold.latency import Timing
    from normfold.torch.layer_collapse import cost

    def by_macs(self, module):
        return Timing((cost.macs(driver.trace(module), self.single) / 1e3,) * 3)

    def against_dense(self, module):
        timing, dense = by_macs(self, module), by_macs(self, self.dense_merged)
        return timing, Timing(tuple(t / d for t, d in zip(timing.rounds, dense.rounds)))

    def segment_by_macs(table, module, inputs):
        return Timing((segment_factor * cost.macs(module, inputs) / 1e3,) * 3)

    monkeypatch.setattr(driver._Run, "latency", by_macs)
    monkeypatch.setattr(driver._Run, "against_dense", against_dense)
    monkeypatch.setattr(segments, "timing", segment_by_macs)
    result = _run(_small_mbv2(), target_latency=target, prune=False, measure_latency=True, max_steps=1,
                  latency_runs=3, latency_repeats=3)
    (step,) = result.history
    first = step.fit[0]
    assert step.latency_ratio["median"] <= target
    assert step.latency_ms == pytest.approx(step.latency_ratio["median"] * result.report["dense"]["latency_ms_merged"])
    if segment_factor > 1:  # the DP's choice, measured whole, misses the budget: the DP ran again for more
        assert first["ratio"]["median"] > target and len(step.candidates) > len(first["candidates"])
    else:  # it overshoots: removals the budget does not need are dropped
        assert first["ratio"]["median"] <= target and len(step.candidates) < len(first["candidates"])
    for label in step.candidates:  # every removal kept is needed: without it the budget is missed
        without = [row for row in step.fit if set(row["candidates"]) == set(step.candidates) - {label}]
        assert not step.candidates[1:] or (without and without[0]["ratio"]["q3"] > target)


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):  # mostly-on channels, as a trained network has
                module.running_mean.uniform_(-1, 1)
                module.bias.data.uniform_(0.0, 1.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@pytest.mark.parametrize(("spread", "withdrawn"), [(1.5, True), (0.5, False)], ids=["noisy", "quiet"])
def test_a_pruned_branch_is_offered_only_where_it_saves_more_than_merging_its_block(monkeypatch, spread, withdrawn):
    # "Latency" is the layer count here, with a spread: merging the first BasicBlock's two convs
    # into one saves one layer, pruning its branch two; one layer more is noise under a spread of
    # 1.5 (the pruning is withdrawn for the merge) and a measurable gain under 0.5. The last
    # block merges with the classifier too (two layers saved): its pruning saves no more, always.
    from normfold.latency import Timing

    def rounds(value: float) -> Timing:
        return Timing((value - spread, value, value + spread))

    def by_layers(self, module):
        return rounds(float(layer_count(driver.trace(module)) + 1))

    def against_dense(self, module):
        timing, dense = by_layers(self, module), by_layers(self, self.dense_merged)
        return timing, Timing(tuple(t / dense.median for t in timing.rounds))

    monkeypatch.setattr(driver._Run, "latency", by_layers)
    monkeypatch.setattr(driver._Run, "against_dense", against_dense)
    monkeypatch.setattr(segments, "timing", lambda table, module, inputs: rounds(float(layer_count(module) + 1)))
    result = _run(_TinyResNet(), target_latency=0.6, measure_latency=True, max_steps=1, latency_runs=3,
                  latency_repeats=3)
    (step,) = result.history
    reasons = {r["node"]: r["reason"] for r in step.refused}
    gave_way = [label for label, reason in reasons.items() if reason.startswith("withdrawn: the exact merge")]
    assert sorted(gave_way) == (["prune add", "prune add_1"] if withdrawn else ["prune add_1"])
    assert "blocks_1_relu+blocks_1_relu_1" in reasons["prune add_1"]
    if withdrawn:
        assert not any(label.startswith("prune") for label in step.candidates)
