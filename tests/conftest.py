"""Small ONNX models built in code for the tests that need a graph but not the torch zoo, and
the ``cli`` fixture that runs ``normfold`` commands in this process."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def conv_bn_relu_model(*, seed: int = 0, opset: int = 17, channels: int = 4) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv(3x3, pad 1) -> BatchNormalization -> Relu, with non-trivial statistics."""
    rng = np.random.default_rng(seed)
    weights = {
        "w": rng.normal(size=(channels, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(size=channels).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, size=channels).astype(np.float32),
        "beta": rng.normal(size=channels).astype(np.float32),
        "mean": rng.normal(size=channels).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, size=channels).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], ["bn_out"],
            name="bn", epsilon=1e-5,
        ),
        helper.make_node("Relu", ["bn_out"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def conv_bn_path(tmp_path: Path) -> Path:
    path = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_relu_model(), path)
    return path


@dataclasses.dataclass
class CliResult:
    """What a ``normfold`` command did: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., CliResult]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``normfold ARGS`` in this process (``normfold.cli.main``), as a shell would see it:
    the exit status, stdout and stderr. No new interpreter per command: the CLI tests stay fast."""
    from normfold.cli import main

    def run(*args: str, cwd: Path | None = None) -> CliResult:
        capsys.readouterr()
        with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
            try:
                code = main(list(args))
            except SystemExit as done:  # argparse: --help, --version, usage errors
                code = done.code if isinstance(done.code, int) else 2
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m normfold ARGS`` in a new interpreter, the way a user's shell would (for the
    few tests about the process itself; the others use the in-process :func:`cli` fixture)."""
    return subprocess.run(
        [sys.executable, "-m", "normfold", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a test module: the machine's cores are shared, and one thread each
    is faster than oversubscribed threads."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
