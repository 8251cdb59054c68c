"""normfold.deferred_imports: a deferred module runs once, on first use, and every way of
importing it or its submodules sees the same real modules.

Most tests defer a package written for the test (each module records that it ran); the last
ones run the ``normfold`` process entry point in a fresh interpreter, where sympy is deferred.
"""

from __future__ import annotations

import importlib
import itertools
import json
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normfold.deferred_imports import defer

_counter = itertools.count()


class Package:
    """``pkgN`` (its ``__init__`` imports ``.core``, which imports ``.core.expr``), ``pkgN.extra``
    (imported by nobody) and ``userN``, a module that does ``import pkgN`` as onnx_ir does sympy."""

    def __init__(self, root: Path) -> None:
        number = next(_counter)
        self.name, self.user, self.log = f"deferme{number}", f"deferuser{number}", f"deferlog{number}"
        files = {
            f"{self.name}/__init__.py": "from .core import Expr\nVALUE = 7\n",
            f"{self.name}/core/__init__.py": "from .expr import Expr\n",
            f"{self.name}/core/expr.py": "class Expr:\n    pass\n",
            f"{self.name}/extra.py": f"from {self.name} import VALUE\nDOUBLE = 2 * VALUE\n",
            f"{self.user}.py": f"import {self.name}\n\ndef value():\n    return {self.name}.VALUE\n",
        }
        for relative, body in files.items():
            module = relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"import {self.log}\n{self.log}.ran.append({module!r})\n{body}")
        self.ran: list[str] = []
        log = types.ModuleType(self.log)
        log.ran = self.ran  # type: ignore[attr-defined]
        sys.modules[self.log] = log

    def forget(self) -> None:
        for name in [n for n in sys.modules if n.split(".")[0] in (self.name, self.user, self.log)]:
            del sys.modules[name]


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Package]:
    sys.path.insert(0, str(tmp_path))
    made = Package(tmp_path)
    yield made
    made.forget()
    sys.path.remove(str(tmp_path))


def _real(package: Package) -> types.ModuleType:
    """The package module as a plain import leaves it (the stand-in once it ran is its copy)."""
    module = sys.modules[package.name]
    return module.__dict__.get("_normfold_real", module)


def test_importing_binds_a_stand_in_and_first_use_runs_the_package_once(package: Package) -> None:
    finder = defer([package.name])
    try:
        user = importlib.import_module(package.user)
        assert package.ran == [package.user]  # `import pkg` ran nothing of pkg
        assert user.value() == 7
        assert package.ran == [package.user, package.name, f"{package.name}.core", f"{package.name}.core.expr"]
        assert user.value() == 7
        assert len(package.ran) == 4
        assert finder not in sys.meta_path  # nothing left to defer: it took itself off
    finally:
        finder.remove()


# Every way code reaches the package or a submodule, by name; each returns the Expr it sees.
def _import_submodule(p: Package) -> object:
    return importlib.import_module(f"{p.name}.core.expr").Expr


def _from_package_import(p: Package) -> object:
    namespace: dict[str, object] = {}
    exec(f"from {p.name} import Expr", namespace)
    return namespace["Expr"]


def _from_subpackage_import(p: Package) -> object:
    namespace: dict[str, object] = {}
    exec(f"from {p.name}.core import expr", namespace)
    return namespace["expr"].Expr  # type: ignore[attr-defined]


def _dotted_import(p: Package) -> object:
    namespace: dict[str, object] = {}
    exec(f"import {p.name}.core.expr", namespace)
    return namespace[p.name].core.expr.Expr  # type: ignore[attr-defined]


def _through_user(p: Package) -> object:
    importlib.import_module(p.user).value()
    return sys.modules[p.user].__dict__[p.name].Expr


def _unimported_submodule(p: Package) -> object:
    assert importlib.import_module(f"{p.name}.extra").DOUBLE == 14
    return sys.modules[p.name].Expr


USES = [_import_submodule, _from_package_import, _from_subpackage_import, _dotted_import, _through_user,
        _unimported_submodule]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uses=st.lists(st.sampled_from(USES), min_size=1, max_size=6), bind_first=st.booleans())
def test_every_order_of_uses_runs_each_module_once_and_sees_one_class(
    tmp_path_factory: pytest.TempPathFactory, uses: list, bind_first: bool
) -> None:
    root = tmp_path_factory.mktemp("pkg")
    sys.path.insert(0, str(root))
    package = Package(root)
    finder = defer([package.name])
    try:
        if bind_first:  # the onnx_ir case: something imported the name before anyone used it
            importlib.import_module(package.user)
            assert package.name not in package.ran
        seen = {use(package) for use in uses}
        real = _real(package)
        assert seen == {real.Expr}
        assert sys.modules[f"{package.name}.core.expr"].Expr is real.Expr
        assert sys.modules[f"{package.name}.core"] is real.core
        assert len(package.ran) == len(set(package.ran)), package.ran  # no module ran twice
    finally:
        finder.remove()
        package.forget()
        sys.path.remove(str(root))


def test_a_name_not_installed_fails_to_import_as_it_would(package: Package) -> None:
    finder = defer(["normfold_no_such_module"])
    try:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module("normfold_no_such_module")
    finally:
        finder.remove()
    assert finder not in sys.meta_path


def test_an_error_in_the_deferred_module_surfaces_at_each_use(package: Package, tmp_path: Path) -> None:
    (tmp_path / package.name / "__init__.py").write_text("raise RuntimeError('broken install')\n")
    finder = defer([package.name])
    try:
        stand_in = importlib.import_module(package.name)  # binds; the error waits for use
        for _ in range(2):
            with pytest.raises(RuntimeError, match="broken install"):
                stand_in.VALUE  # noqa: B018
    finally:
        finder.remove()


def test_a_name_imported_already_is_left_alone() -> None:
    finder = defer(["json"])
    try:
        assert importlib.import_module("json") is json
    finally:
        finder.remove()
    assert finder not in sys.meta_path


# --- the normfold process -------------------------------------------------------------------

_PROCESS = """
import json, sys
from normfold.cli import run
codes = [run(argv) for argv in json.loads(sys.argv[1])]
ran_sympy = "sympy.core" in sys.modules
import onnx_ir as ir, sympy
from sympy.core.numbers import Integer
print(json.dumps({"codes": codes, "ran_sympy": ran_sympy, "dim": (ir.SymbolicDim("seq") + 1).value,
                  "one_integer": Integer is sympy.Integer}))
"""


def _process(*commands: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROCESS, json.dumps(list(commands))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_cnn_run_never_executes_sympy_and_sympy_still_works_after(conv_bn_path: Path, tmp_path: Path) -> None:
    answer = _process(["optimize", str(conv_bn_path), "-o", str(tmp_path / "out.onnx")])
    assert answer == {"codes": [0], "ran_sympy": False, "dim": "seq + 1", "one_integer": True}


@pytest.mark.slow
def test_a_run_that_needs_sympy_writes_what_the_in_process_run_writes(tmp_path: Path, cli) -> None:
    pytest.importorskip("torch")
    from normfold.models.export import cached_export

    # A TorchScript BERT at opset 13: its shapes need onnxruntime's symbolic inference (sympy).
    source = cached_export("bert", "ts13")
    answer = _process(["optimize", str(source), "-o", str(tmp_path / "process.onnx")])
    assert answer["codes"] == [0] and answer["ran_sympy"] and answer["one_integer"]
    assert cli("optimize", str(source), "-o", str(tmp_path / "in_process.onnx")).returncode == 0
    assert (tmp_path / "process.onnx").read_bytes() == (tmp_path / "in_process.onnx").read_bytes()


def test_the_console_script_is_the_deferring_entry_point() -> None:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["normfold"] == "normfold.cli:run"


def test_python_m_normfold_defers_sympy(conv_bn_path: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "normfold", "optimize", str(conv_bn_path),
         "-o", str(tmp_path / "out.onnx"), "--no-verify"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    executed = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "onnx_ir._core" in executed  # the run did import onnx_ir, which imports sympy ...
    assert "sympy.core" not in executed  # ... but sympy itself never ran
