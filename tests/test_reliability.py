"""Issue 10's promises under hostile input, faults and races (docs/reliability.md maps each).

Every command runs in-process through ``normfold.cli.main``; stderr is captured at the file
descriptor (``capfd``), where onnxruntime's C++ logger would write, so "one line" counts
everything a user sees.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from normfold import files, io, runtime
from normfold.cli import main
from tests.conftest import conv_bn_relu_model
from tests.malformed import BAD, UNUSUAL, external_copy


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) and its content's digest."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*")) if not path.is_symlink()
    }


def _argv(verb: str, path: Path, out: Path) -> list[str]:
    return {
        "optimize": ["optimize", str(path), "-o", str(out / "out.onnx"), "--report", str(out / "r.json")],
        "verify": ["verify", str(path), str(path), "--report", str(out / "r.json")],
        "inspect": ["inspect", str(path), "--json"],
    }[verb]


def _one_line(capfd: pytest.CaptureFixture[str]) -> str:
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("normfold: error: "), lines[0]
    return lines[0]


# --- 3, 7: the malformed corpus -----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_input_exits_2_with_one_line_and_touches_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str
) -> None:
    """Each verb: exit 2, one stderr line naming the file, the folder byte for byte as it was.
    And optimize, verify and inspect classify the file the same way (the same reason)."""
    path = BAD[kind](tmp_path)
    before = _snapshot(tmp_path)
    reasons = set()
    for verb in ("optimize", "verify", "inspect"):
        capfd.readouterr()
        assert main(_argv(verb, path, tmp_path)) == 2, verb
        line = _one_line(capfd)
        assert str(path) in line, line
        reasons.add(line.split(": ", 3)[-1])
        assert _snapshot(tmp_path) == before, verb  # input unchanged, nothing written, nothing left
    assert len(reasons) == 1, reasons


# --- 4: valid but unusual ONNX ----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(UNUSUAL))
def test_unusual_valid_models_work(tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str) -> None:
    path = UNUSUAL[kind](tmp_path)
    before = _snapshot(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["optimize", str(path), "-o", str(out / "o.onnx"), "--report", str(out / "r.json"), "-q"]) == 0
    report = json.loads((out / "r.json").read_text())
    assert report["verification"]["passed"] is True
    assert main(["verify", str(path), str(out / "o.onnx"), "-q"]) == 0
    assert main(["inspect", str(path)]) == 0
    assert capfd.readouterr().err == ""
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("out")} == before


def test_batchnorms_inside_subgraphs_are_folded(tmp_path: Path) -> None:
    import normfold

    for kind in ("if", "loop"):
        folder = tmp_path / kind
        folder.mkdir()
        result = normfold.optimize(UNUSUAL[kind](folder))
        assert result.verified
        assert "BatchNormalization" in result.report["ops_before"]
        assert "BatchNormalization" not in result.report["ops_after"]


def test_function_bodies_are_left_with_a_reason(tmp_path: Path) -> None:
    import normfold

    result = normfold.optimize(UNUSUAL["function"](tmp_path))
    assert result.verified
    cleanup = result.report["passes"][0]
    assert cleanup["name"] == "cleanup"
    assert any("function local::Shift" in note and "left as it is" in note for note in cleanup["notes"])


# --- 6: verify checks both models -------------------------------------------------------------


def test_verify_refuses_an_invalid_reference_and_fails_an_invalid_candidate(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.onnx"
    onnx.save(conv_bn_relu_model(), good)
    bad = tmp_path / "bad.onnx"
    model = conv_bn_relu_model()
    model.graph.initializer.append(model.graph.initializer[0])  # an initializer twice
    onnx.save(model, bad)
    capfd.readouterr()
    assert main(["verify", str(bad), str(good), "-q"]) == 2
    assert "fails onnx.checker" in _one_line(capfd)
    assert main(["verify", str(good), str(bad), "-q", "--report", str(tmp_path / "v.json")]) == 1
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] is False
    assert any("fails onnx.checker" in problem and "given twice" in problem for problem in report["problems"])


# --- 1: paths, checked before any work ---------------------------------------------------------


def _path_cases(folder: Path) -> list[list[str]]:
    path = external_copy(folder)
    os.mkfifo(folder / "fifo")
    (folder / "sub").mkdir()
    (folder / "link.onnx").symlink_to(folder.parent / "elsewhere.onnx")
    (folder / "hard.onnx").hardlink_to(path)
    calibration = folder / "x.npz"
    np.savez(calibration, x=np.zeros((2, 3, 8, 8), np.float32))
    m = str(path)
    return [
        ["optimize", m, "-o", m],
        ["optimize", m, "-o", "o.onnx", "--report", m],
        ["optimize", m, "-o", "o.onnx", "--report", "in.data"],
        ["optimize", m, "-o", "hard.onnx"],
        ["optimize", m, "-o", "o.onnx", "--report", "o.onnx"],
        ["optimize", m, "-o", "o.onnx", "--external-data", "o.onnx"],
        ["optimize", m, "-o", "o.onnx", "--external-data", "in.data"],
        ["optimize", m, "-o", "o.onnx", "--external-data", "../w.data"],
        ["optimize", m, "-o", "o.onnx", "--inputs", str(calibration), "--report", str(calibration)],
        ["optimize", m, "-o", "o.onnx", "--save-inputs", "in.data"],
        ["optimize", m, "-o", "/dev/null"],
        ["optimize", m, "-o", "fifo"],
        ["optimize", m, "-o", "sub"],
        ["optimize", m, "-o", "link.onnx"],
        ["optimize", m, "-o", "nodir/o.onnx"],
        ["optimize", m, "-o", "o.onnx", "--report", "nodir/r.json"],
        ["verify", m, m, "--report", m],
        ["verify", m, m, "--report", "in.data"],
        ["verify", m, m, "--save-inputs", "/dev/null"],
        ["collapse", m, "-o", m, "--remove", "1"],
        ["collapse", m, "-o", "o.onnx", "--report", "in.data", "--remove", "1"],
        ["collapse", m, "-o", "o.onnx", "--calibration", str(calibration), "--report", str(calibration)],
    ]


def test_bad_paths_exit_2_before_any_work(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import normfold.jobs.collapse
    import normfold.jobs.optimize
    import normfold.verification

    def tripwire(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the paths were checked")

    # The job functions: a refused path must be answered before any of them runs.
    for module, name in ((normfold.jobs.optimize, "optimize"), (normfold.verification, "verify"),
                         (normfold.jobs.collapse, "collapse_onnx")):
        monkeypatch.setattr(module, name, tripwire)
    folder = tmp_path / "work"
    folder.mkdir()
    cases = _path_cases(folder)
    monkeypatch.chdir(folder)
    before = _snapshot(folder)
    for argv in cases:
        capfd.readouterr()
        assert main([*argv, "-q"]) == 2, argv
        _one_line(capfd)
        assert _snapshot(folder) == before, argv
    assert not (tmp_path / "elsewhere.onnx").exists()


# --- 2: atomic pairs, a kill between the renames, stale staging --------------------------------


def _model(scale: float) -> onnx.ModelProto:
    model = conv_bn_relu_model()
    weight = model.graph.initializer[0]
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * scale, weight.name))
    return model


def _outputs(path: Path) -> np.ndarray:
    feeds = {"x": np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)}
    return runtime.run(path, feeds)["y"]


def _save_killed_at(step: str, model: onnx.ModelProto, out: Path) -> int:
    """Save ``model`` over ``out`` (external data) in a child process killed at commit ``step``."""

    def child() -> None:
        files.commit_hook = lambda at: os._exit(9) if at == step else None
        io.save(io.load(model), out, external_data="w.data")
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    return process.exitcode


@pytest.mark.parametrize("step", ["staged", "data", "model"])
def test_a_kill_between_the_renames_leaves_a_consistent_pair(tmp_path: Path, step: str) -> None:
    out = tmp_path / "o.onnx"
    old, new = _model(1.0), _model(2.0)
    io.save(io.load(old), out, external_data="w.data")
    old_files = {p.name for p in tmp_path.iterdir()}
    expected = _outputs(out)
    assert _save_killed_at(step, new, out) == 9
    left = {p.name for p in tmp_path.iterdir()} - old_files
    assert any(name.startswith(".normfold-") for name in left)  # the killed run's staging folder
    if step in ("staged", "data"):  # killed before the model's rename: the old pair stands
        np.testing.assert_array_equal(_outputs(out), expected)
    else:  # killed after it: the new pair stands
        np.testing.assert_allclose(_outputs(out), _outputs_of(new), rtol=1e-6)
    io.input_files(out)  # OUT's data is complete and in place
    # The next run writing in that folder removes the staging folder and the orphan data.
    files.write_atomic(tmp_path / "r.json", lambda file: file.write(b"{}"))
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in io.input_files(out)} | {"r.json"}


def _outputs_of(model: onnx.ModelProto) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        onnx.save(model, path)
        return _outputs(path)


def test_saving_again_replaces_the_pair_and_removes_the_old_data(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    for scale in (1.0, 2.0, 3.0):
        io.save(io.load(_model(scale)), out, external_data="w.data")
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in io.input_files(out)}
    np.testing.assert_allclose(_outputs(out), _outputs_of(_model(3.0)), rtol=1e-6)
    io.save(io.load(_model(1.0)), out)  # one file now: the data file goes
    assert [p.name for p in tmp_path.iterdir()] == ["o.onnx"]


def test_saving_over_a_single_file_out_removes_nothing_else(tmp_path: Path) -> None:
    # With no data file normfold wrote in the folder, OUT is replaced without being read.
    out = tmp_path / "o.onnx"
    (tmp_path / "notes.data").write_bytes(b"a user's file")
    for scale in (1.0, 2.0):
        io.save(io.load(_model(scale)), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.data", "o.onnx"]
    np.testing.assert_allclose(_outputs(out), _outputs_of(_model(2.0)), rtol=1e-6)


def test_a_live_writers_staging_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / f".normfold-{os.getppid()}-00ff"  # a live process (our parent)
    mine.mkdir()
    files.write_atomic(tmp_path / "r.json", lambda file: file.write(b"{}"))
    assert mine.is_dir()


def test_reports_are_written_with_the_usual_permissions(tmp_path: Path, conv_bn_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main(["optimize", str(conv_bn_path), "-o", str(tmp_path / "o.onnx"),
                     "--report", str(tmp_path / "r.json"), "--no-verify", "-q"]) == 0
    finally:
        os.umask(old)
    for name in ("r.json", "o.onnx"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_a_full_disk_or_refused_write_is_exit_2(
    tmp_path: Path, conv_bn_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def fail(model: object, path: Path) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io, "_save_single_file", fail)
    before = _snapshot(tmp_path)
    capfd.readouterr()
    assert main(["optimize", str(conv_bn_path), "-o", str(tmp_path / "o.onnx"), "--no-verify", "-q"]) == 2
    assert os.strerror(code) in _one_line(capfd)
    assert _snapshot(tmp_path) == before


# --- 9: racing writers ------------------------------------------------------------------------


def test_racing_writers_leave_one_complete_pair(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)

    def writer(scale: float) -> None:
        model = io.load(_model(scale))
        barrier.wait()
        for _ in range(5):
            io.save(model, out, external_data="w.data")
        os._exit(0)

    processes = [context.Process(target=writer, args=(scale,)) for scale in (1.0, 2.0)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    candidates = [_outputs_of(_model(scale)) for scale in (1.0, 2.0)]
    got = _outputs(out)
    assert any(np.allclose(got, c, rtol=1e-6) for c in candidates)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in io.input_files(out)}
