"""normfold.torch.collapse end to end on a small CNN trained on scikit-learn's digits."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="the digits data ships with scikit-learn"
)]

from normfold.errors import InputError  # noqa: E402
from normfold.examples import digits  # noqa: E402
from normfold.torch import collapse  # noqa: E402
from normfold.torch.layer_collapse import format_report  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    data = digits.load()
    model = digits.build("digits-vgg")
    with torch.random.fork_rng(devices=[]):
        digits.train(model, data, epochs=2)
    return data, model


def _collapse(data, model, **settings):
    settings.setdefault("max_accuracy_drop", 1.0)
    settings.setdefault("measure_latency", False)
    with torch.random.fork_rng(devices=[]):
        return collapse(
            model,
            digits.batches(data.train_x[:256], data.train_y[:256], 64),
            evaluate=settings.pop("evaluate", lambda m: digits.accuracy(m, data.val_x, data.val_y)),
            example_inputs=data.val_x[:4],
            progress=False,
            **settings,
        )


def test_collapse_with_finetuning_merges_layers_and_reports(trained, tmp_path):
    data, model = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def finetune(module, step):
        calls.append(step)
        digits.finetuner(data, epochs=1)(module, step)

    result = _collapse(data, model, finetune=finetune, max_steps=2, measure_latency=True)
    assert calls == [1, 2]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert [s.accepted for s in result.history] == [True, True]
    last = result.history[-1]
    assert last.activations_removed == sum(len(s.sites) for s in result.history) >= 2
    assert last.layers_merged >= 2
    assert last.macs < result.report["dense"]["macs"]
    assert not result.model.training
    merges = [m for step in result.report["steps"] for m in step["merges"]]
    assert merges and all(m["max_error"] < 1e-4 for m in merges if m["exact"])
    # MaxPool-bound sites are refused with their reason in every row.
    reasons = {r["node"]: r["reason"] for r in last.refused}
    assert "MaxPool2d features.6 (nonlinear)" in reasons["features_5"]
    # The returned model is the last step's merged model; the report is plain JSON.
    torch.testing.assert_close(result.model(data.val_x), last.model(data.val_x))
    json.dumps(result.report)
    assert "stopped: max_steps reached" in format_report(result.report)


def test_checkpoints_resume_and_runs_repeat(trained, tmp_path):
    data, model = trained

    def finetune(module, step):
        digits.finetuner(data, epochs=1)(module, step)

    fresh = _collapse(data, model, finetune=finetune, max_steps=2)
    _collapse(data, model, finetune=finetune, max_steps=1, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "collapse.pt", weights_only=True)  # plain tensors and strings
    linearized = [edit["site"] for edit in state["edits"] if edit["op"] == "linearize"]
    assert linearized == fresh.history[0].sites
    resumed = _collapse(data, model, finetune=finetune, max_steps=2, checkpoint_dir=tmp_path)
    assert resumed.history[0].model is None  # restored from the checkpoint
    assert [s.site for s in resumed.history] == [s.site for s in fresh.history]
    assert resumed.history[1].accuracy == fresh.history[1].accuracy
    torch.testing.assert_close(resumed.model(data.val_x), fresh.model(data.val_x))


def test_an_accuracy_drop_undoes_the_step_and_stops(trained):
    data, model = trained
    result = _collapse(data, model, max_accuracy_drop=-1.0, rank="score")
    (step,) = result.history
    assert not step.accepted
    assert "step undone" in result.report["stopped"]
    with torch.no_grad():
        torch.testing.assert_close(result.model(data.val_x), model.eval()(data.val_x), rtol=1e-4, atol=1e-4)


def test_target_depth_stops_early(trained):
    data, model = trained
    total = _collapse(data, model, max_steps=0).report["dense"]["activations"]
    result = _collapse(data, model, target_depth=total - 1, rank="score")
    assert len(result.history) == 1 and result.report["stopped"] == "target depth reached"


def test_untraceable_models_are_refused():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(InputError, match="torch.fx can trace"):
        collapse(Branchy(), [torch.ones(1, 2)], evaluate=lambda m: 0.0, example_inputs=torch.ones(1, 2))


@pytest.mark.slow  # trains a digits CNN
def test_the_embedded_example_writes_model_report_and_plot(tmp_path, cli):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cnn.onnx"
    done = cli("collapse", "--example", "digits-cnn", "-o", str(out), "--epochs", "2",
                   "--finetune-epochs", "1", "--max-accuracy-drop", "1", "-q")
    assert done.returncode == 0, done.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["onnx"]["argmax_agreement"] == 1.0 and report["onnx"]["max_abs_error_vs_torch"] < 1e-4
    assert report["steps"] and all(step["accepted"] for step in report["steps"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in done.stdout


@pytest.mark.parametrize(("flag", "value"), [("--target-latency", "1.5"), ("--distill", "2")])
def test_example_budget_and_distillation_flags_are_checked_first(tmp_path, capsys, flag, value):
    from normfold.cli import main

    out = tmp_path / "cnn.onnx"
    assert main(["collapse", "--example", "digits-cnn", "-o", str(out), flag, value]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and flag in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("per_sample", "accepted"), [(False, True), (True, False)], ids=["mean", "paired"])
def test_per_sample_scores_make_a_step_clear_the_floor_by_its_paired_standard_error(trained, per_sample, accepted):
    data, model = trained
    dense_scores = np.ones(100)
    step_scores = np.r_[np.zeros(3), np.ones(97)]  # 0.97: 3 of 100 lost; paired standard error 0.017
    answers = iter([dense_scores, step_scores])

    def evaluate(module):
        scores = next(answers)
        return scores if per_sample else float(scores.mean())

    result = _collapse(data, model, max_steps=1, max_accuracy_drop=0.04, evaluate=evaluate)  # floor 0.96
    (step,) = result.history
    assert step.accuracy == pytest.approx(0.97)
    assert step.accepted is accepted
    if not accepted:
        assert "less its standard error 0.0171" in result.report["stopped"]


def test_evaluate_must_answer_a_number_or_per_sample_scores(trained):
    data, model = trained
    with pytest.raises(InputError, match="1-D array of per-sample scores"):
        _collapse(data, model, max_steps=1, evaluate=lambda module: np.ones((2, 2)))


@pytest.mark.parametrize(("after_each_round", "recovery_rounds", "rounds", "accepted"), [
    ([0.5, 0.8, 0.97], 2, 3, True),  # recovered in the second extra round
    ([0.5, 0.8, 0.97], 1, 2, False),  # out of rounds below the floor
    ([0.5, 0.4, 0.99], 5, 2, False),  # a round that did not help ends the recovery
    ([0.97], 0, 1, True),  # above the floor at once: no extra round
], ids=["recovered", "out-of-rounds", "no-gain", "not-needed"])
def test_a_step_below_the_floor_is_fine_tuned_again_before_it_is_undone(
    trained, after_each_round, recovery_rounds, rounds, accepted
):
    data, model = trained
    answers = iter([1.0, *after_each_round])  # the dense model's accuracy, then one per fine-tune
    calls = []

    def finetune(module, step):
        calls.append(step)
        digits.finetuner(data, epochs=1)(module, step)

    result = _collapse(data, model, max_steps=1, max_accuracy_drop=0.04, rank="score",  # floor 0.96
                       evaluate=lambda module: next(answers), finetune=finetune, recovery_rounds=recovery_rounds)
    (step,) = result.history
    assert calls == [1] * rounds and step.finetune_rounds == rounds
    assert step.accepted is accepted
    assert step.accuracy == after_each_round[rounds - 1]


def test_recovery_rounds_are_a_count(trained):
    data, model = trained
    with pytest.raises(InputError, match="recovery_rounds"):
        _collapse(data, model, max_steps=1, recovery_rounds=-1)
