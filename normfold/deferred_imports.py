"""Deferred imports for the ``normfold`` process: a heavy module a run may never use is executed
on first use instead of at start-up.

onnx_ir imports sympy as it is imported, for arithmetic on symbolic dimensions (``"seq" + 1``).
That is ~0.2 s of CPU, a fifth of a whole ``normfold optimize --no-verify`` process on a small
model, and a run that does no such arithmetic never reads sympy. The command
(:func:`normfold.cli.run`) therefore defers :data:`PROCESS_DEFERRED`; the library defers nothing
(``import normfold`` leaves a host program's imports as they are).

The rule: while a name is deferred, importing it binds a *stand-in*, an empty module with the
real one's ``__spec__``/``__path__``; the first read of any other attribute executes the real
module once and copies its namespace into the stand-in, so every holder sees the real objects
(``isinstance`` against real classes included). Importing a submodule of a deferred package
(``import sympy.core``) first executes the package as a plain import would, so no module is ever
executed twice and ``sympy.core.Expr is sympy.Expr`` holds in whichever order code touches them.
Preconditions: the deferred module's import has no side effect anyone relies on before it is
used, and names are deferred before anything imports them (a name already imported is left
alone).
"""

from __future__ import annotations

__all__ = ["PROCESS_DEFERRED", "DeferringFinder", "defer"]

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Iterable, Sequence

# sympy: imported by onnx_ir for symbolic-dimension arithmetic. onnx_ir's expression parser
# reads sympy's functions when it is imported, so it waits too (it is only used to parse an
# expression, which is the moment sympy is needed anyway).
PROCESS_DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")


class DeferringFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: binds stand-ins for deferred names and executes them on use."""

    def __init__(self, names: Iterable[str]) -> None:
        self._waiting = {name for name in names if name not in sys.modules}
        self._standing: dict[str, _StandIn] = {}
        self._lock = threading.RLock()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        with self._lock:
            if fullname in self._waiting:
                return self._stand_in_spec(fullname, path)
            package = next((name for name in self._standing if fullname.startswith(name + ".")), None)
        if package is None:
            return None
        # A submodule of a package not executed yet: the package runs first (see _AfterPackage).
        return importlib.util.spec_from_loader(fullname, _AfterPackage(self, package))

    def remove(self) -> None:
        """Stop deferring names not imported yet; stand-ins already bound still execute on use."""
        with self._lock:
            self._waiting.clear()
            if self in sys.meta_path and not self._standing:
                sys.meta_path.remove(self)

    def materialize(self, name: str) -> types.ModuleType:
        """Execute the deferred module ``name`` (once) and return the real module."""
        with self._lock:
            stand_in = self._standing.pop(name, None)
            if stand_in is None:  # executed already (or by another thread meanwhile)
                return sys.modules[name]
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
            try:
                real = importlib.import_module(name)
            except BaseException:
                self._standing[name] = stand_in
                sys.modules[name] = stand_in
                raise
            stand_in.__dict__.update(real.__dict__)
            stand_in._normfold_real = real
            if not self._waiting and not self._standing and self in sys.meta_path:
                sys.meta_path.remove(self)
            return real

    def _stand_in_spec(self, fullname: str, path: Sequence[str] | None) -> importlib.machinery.ModuleSpec | None:
        real_spec = next(
            (
                spec
                for finder in sys.meta_path
                if finder is not self and hasattr(finder, "find_spec")
                and (spec := finder.find_spec(fullname, path)) is not None
            ),
            None,
        )
        if real_spec is None:
            return None  # not installed: the import fails as it would have
        self._waiting.discard(fullname)
        spec = importlib.util.spec_from_loader(fullname, _StandInLoader(self))
        assert spec is not None
        spec.submodule_search_locations = real_spec.submodule_search_locations
        return spec

    def _register(self, stand_in: _StandIn) -> None:
        with self._lock:
            self._standing[stand_in.__name__] = stand_in


class _StandIn(types.ModuleType):
    """A deferred module not executed yet: the first attribute it lacks executes the real one."""

    def __getattr__(self, attribute: str) -> object:
        real = self.__dict__.get("_normfold_real")
        if real is None:
            finder = self.__dict__.get("_normfold_finder")
            if finder is None:  # the import machinery probing it while it is being created
                raise AttributeError(attribute)
            real = finder.materialize(self.__name__)
        return getattr(real, attribute)


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, finder: DeferringFinder) -> None:
        self._finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        stand_in = _StandIn(spec.name)
        if spec.submodule_search_locations is not None:
            # Present before the import machinery reads it, so reading it executes nothing.
            stand_in.__path__ = list(spec.submodule_search_locations)
        return stand_in

    def exec_module(self, module: types.ModuleType) -> None:
        assert isinstance(module, _StandIn)
        self._finder._register(module)
        module._normfold_finder = self._finder  # from now on, a missing attribute executes it


class _AfterPackage(importlib.abc.Loader):
    """Loads a submodule of a deferred package: the package first, as a plain import would.

    The package's own ``__init__`` usually imports the submodule; that module is then the one
    returned, its ``__spec__`` put back after the import machinery overwrote it.
    """

    def __init__(self, finder: DeferringFinder, package: str) -> None:
        self._finder = finder
        self._package = package
        self._real_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        self._finder.materialize(self._package)
        module = sys.modules.get(spec.name)
        if module is None:  # not imported by the package: import it now, the package being real
            module = importlib.import_module(spec.name)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._real_spec  # executed already; only undo the machinery's stamp


def defer(names: Iterable[str]) -> DeferringFinder:
    """Defer ``names`` (those not imported yet) in this process; ``.remove()`` stops it."""
    finder = DeferringFinder(names)
    sys.meta_path.insert(0, finder)
    return finder
