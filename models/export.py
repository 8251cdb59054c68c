"""Export zoo models to ONNX the ways users do, and keep the results in a cache.

Each :class:`ExportVariant` is one set of ``torch.onnx.export`` settings found in the wild:

- ``ts13``, ``ts14``, ``ts17``: the TorchScript exporter (``dynamo=False``) at that opset, eval
  mode, constant folding on. In eval mode with constant folding the exporter folds a Conv's
  BatchNorm itself (not a BatchNorm after a Linear); below opset 17 it decomposes
  ``nn.LayerNorm`` into primitive ops, from 17 on it emits LayerNormalization.
- ``ts13-nofold``, ``ts17-nofold``: ``do_constant_folding=False``.
- ``ts13-keepbn``, ``ts17-keepbn``: ``training=TrainingMode.PRESERVE``, so every BatchNorm stays
  a BatchNormalization node (checked after export).
- ``ts13-inputs``: like ``ts13-keepbn`` with ``keep_initializers_as_inputs=True``, as old
  exporters wrote models: every weight is also a graph input.
- ``ts17-static``: like ``ts17`` with no symbolic axes.
- ``dynamo18``, ``dynamo18-noopt``: the torch.export-based exporter at opset 18, with and
  without its onnxscript optimizer (which folds BatchNorm into Conv itself).
- ``dynamo23``: the same at opset 23, the one opset where onnxscript's ``onnx_fusions`` acts.
  Its optimizer writes the ops opset 23 has: LayerNormalization, GroupNormalization-21,
  RMSNormalization-23 for the HF RMSNorm spellings (T5's, LLaMA's, Gemma's), RotaryEmbedding-23
  for LLaMA-style rotary embeddings (see :data:`KNOWN_FAILURES`). Exported for every family,
  the convolutional ones included, as the benchmarks use it.
- ``ts17-fp16``: like ``ts17`` with the model and its floating inputs in float16
  (:meth:`ZooModel.half`), as users export for half-precision inference. Every family runs in
  float16 on torch 2.13's CPU and onnxruntime 1.32's CPU provider (checked by the zoo tests
  against the float16 torch module).

All but ``-static`` variants give inputs and outputs the symbolic axes of the model's
``dynamic_axes`` ("batch", and "seq" for the transformers); :func:`export` checks that they do,
and that the file passes ``onnx.checker``, before the file appears. :data:`DEFAULT_VARIANT`
(``ts13-keepbn``) keeps BatchNorms and decomposed LayerNorms in the graph, which is what
``normfold optimize --example`` shows off.

Every (model, variant) pair of the zoo exports with torch 2.13.0 to a file onnxruntime 1.32
runs, except the pairs in :data:`KNOWN_FAILURES`, which :func:`export` refuses with the reason.
Files are written atomically (into a temporary folder beside the target, then renamed), so a
reader in another process never sees half a file. The exporters' warnings, log lines and prints
are silenced.

:func:`export` writes the raw file an exporter gives (what normfold's passes are tested on);
:func:`verified_export` writes what a user ships: the model through :func:`normfold.torch.export`
(BatchNorm folded in torch, exported, optimized, verified against the module at the example
sizes and at other sizes of its symbolic axes).

Models over 2 GB export with both exporters into ``<name>.data`` beside the model (measured: a
618M-parameter LLaMA, 2.5 GB, in about 50 s and 5.5 GB of memory with either exporter).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_VARIANT",
    "KNOWN_FAILURES",
    "VARIANTS",
    "ExportVariant",
    "cached_export",
    "default_cache_dir",
    "export",
    "verified_export",
]

import ast
import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import onnx
import onnx_ir as ir

from normfold.errors import InputError, first_line
from normfold.io import EXTERNAL_DATA_THRESHOLD, check_target
from normfold.models import NAMES, TORCH_HINT, ZooModel, build, family_module
from normfold.quiet import silenced

if TYPE_CHECKING:
    import torch

    from normfold.torch import ExportResult


@dataclasses.dataclass(frozen=True)
class ExportVariant:
    """One set of ``torch.onnx.export`` settings; see the module docstring for each variant."""

    name: str
    exporter: Literal["torchscript", "dynamo"]
    opset: int
    constant_folding: bool = True
    keep_bn: bool = False
    initializers_as_inputs: bool = False
    optimize: bool = True
    dynamic: bool = True
    half: bool = False


VARIANTS: dict[str, ExportVariant] = {
    v.name: v
    for v in (
        ExportVariant("ts13", "torchscript", 13),
        ExportVariant("ts14", "torchscript", 14),
        ExportVariant("ts17", "torchscript", 17),
        ExportVariant("ts13-nofold", "torchscript", 13, constant_folding=False),
        ExportVariant("ts17-nofold", "torchscript", 17, constant_folding=False),
        ExportVariant("ts13-keepbn", "torchscript", 13, keep_bn=True),
        ExportVariant("ts17-keepbn", "torchscript", 17, keep_bn=True),
        ExportVariant("ts13-inputs", "torchscript", 13, keep_bn=True, initializers_as_inputs=True),
        ExportVariant("ts17-static", "torchscript", 17, dynamic=False),
        ExportVariant("dynamo18", "dynamo", 18),
        ExportVariant("dynamo18-noopt", "dynamo", 18, optimize=False),
        ExportVariant("dynamo23", "dynamo", 23),
        ExportVariant("ts17-fp16", "torchscript", 17, half=True),
    )
}

DEFAULT_VARIANT = "ts13-keepbn"

# (model, variant) -> why torch 2.13.0 gives no file that onnxruntime 1.32 runs.
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    (name, "dynamo23"): (
        "the exporter's RotaryEmbedding-23 nodes get cos/sin caches of batch 1 (position_ids are "
        "arange(seq).unsqueeze(0), as in HF), which onnxruntime rejects at batch > 1"
    )
    for name in ("llama", "gemma")
}

_QUIET_LOGGERS = ("torch", "onnxscript", "onnx_ir")


def default_cache_dir() -> Path:
    """``$NORMFOLD_CACHE`` if set, else ``~/.cache/normfold/zoo``."""
    configured = os.environ.get("NORMFOLD_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "normfold" / "zoo"


def export(zoo: ZooModel | str, variant: str | ExportVariant, path: str | os.PathLike) -> Path:
    """Export ``zoo`` (a built model, or a zoo name built with seed 0) to ``path``; returns it.

    Models whose tensors exceed ``normfold.io.EXTERNAL_DATA_THRESHOLD`` get one external data
    file, ``<path name>.data``, beside ``path``. Failures, including known ones, raise
    :class:`InputError`; nothing is left at ``path`` then.
    """
    chosen = _variant(variant)
    if isinstance(zoo, str):
        _refuse_known_failure(zoo, chosen)
        zoo = build(zoo)
    _refuse_known_failure(zoo.name, chosen)
    if chosen.half:
        zoo = zoo.half()
    target = check_target(path)
    folder = target.parent
    staging = Path(tempfile.mkdtemp(prefix=".normfold-export-", dir=folder))
    try:
        staged = staging / target.name
        large = _tensor_bytes(zoo.module) > EXTERNAL_DATA_THRESHOLD
        try:
            with silenced(*_QUIET_LOGGERS):
                if chosen.exporter == "torchscript":
                    _export_torchscript(zoo, chosen, staged)
                else:
                    _export_dynamo(zoo, chosen, staged, large)
        except Exception as error:  # the exporters raise many untyped errors
            raise InputError(
                f"cannot export {zoo.name} with {chosen.name}: {type(error).__name__}: {first_line(error)}"
            ) from error
        files = _publishable(staged)
        _check_export(zoo, chosen, files[0])
        # Data first: the model file appears only once what it points to is in place.
        for file in reversed(files):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def verified_export(
    zoo: ZooModel | str, path: str | os.PathLike, *, exporter: Literal["dynamo", "torchscript"] = "dynamo", **options: Any
) -> ExportResult:
    """``zoo`` (a built model, or a zoo name built with seed 0) through :func:`normfold.torch.export`
    with its example inputs, input and output names and symbolic axes; ``options`` go to it
    (``target``, ``opset``, ``sizes``, ...). Raises as it does; nothing is written then."""
    if isinstance(zoo, str):
        zoo = build(zoo)
    from normfold.torch import export as export_verified

    return export_verified(
        zoo.module,
        zoo.example_inputs,
        path,
        input_names=list(zoo.input_names),
        output_names=list(zoo.output_names),
        dynamic_axes=zoo.dynamic_axes,
        exporter=exporter,
        **options,
    )


def cached_export(
    name: str,
    variant: str = DEFAULT_VARIANT,
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    **size: Any,
) -> Path:
    """The path of zoo model ``name`` exported with ``variant``, exporting it on first use.

    The cache key holds the name, variant, seed, size parameters, the torch, onnx and
    onnxscript versions and a hash of the zoo's source, so a changed model or exporter never
    returns a stale file.
    """
    chosen = _variant(variant)
    if name not in NAMES:
        raise InputError(f"unknown zoo model {name!r}; choose one of: {', '.join(NAMES)}")
    _refuse_known_failure(name, chosen)
    # Found and its installed version read, not imported: a cache hit never imports torch (1-2 s).
    if importlib.util.find_spec("torch") is None:
        raise InputError(f"the model zoo ({name}) needs torch: {TORCH_HINT}")
    torch_version = importlib.metadata.version("torch")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256()
    for module in _zoo_sources(name):
        digest.update(Path(_origin(module)).read_bytes())
    # The dynamo exporter translates through onnxscript; both exporters build onnx protos.
    versions = [importlib.metadata.version(package) for package in ("onnx", "onnxscript")]
    digest.update(repr((chosen, sorted(size.items()), versions)).encode())
    path = folder / f"{name}-{chosen.name}-seed{seed}-torch{torch_version}-{digest.hexdigest()[:12]}.onnx"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the zoo cache folder ({first_line(error)})") from None
    return export(build(name, seed=seed, **size), chosen, path)


def _zoo_sources(name: str) -> list[str]:
    """The zoo modules that define model ``name`` and its export: its family module, the zoo
    modules it imports (Gemma's rotary embedding is LLaMA's), this module. Read from the family
    module's source, not the module: importing it imports torch, which a cache hit never needs."""
    family = family_module(name)
    used: set[str] = set()
    for node in ast.walk(ast.parse(Path(_origin(family)).read_bytes())):
        if isinstance(node, ast.Import):
            used.update(alias.name for alias in node.names if _in_zoo(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _in_zoo(node.module):
            used.add(node.module)
            if _is_package(node.module):  # `from normfold.models import llama` names a module
                used.update(f"{node.module}.{alias.name}" for alias in node.names
                            if importlib.util.find_spec(f"{node.module}.{alias.name}") is not None)
    return [family, *sorted(used - {family}), __name__]


def _in_zoo(module: str) -> bool:
    return module == "normfold.models" or module.startswith("normfold.models.")


def _origin(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module)
    return spec.origin


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _variant(variant: str | ExportVariant) -> ExportVariant:
    if isinstance(variant, ExportVariant):
        return variant
    if variant not in VARIANTS:
        raise InputError(f"unknown export variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _refuse_known_failure(name: str, variant: ExportVariant) -> None:
    reason = KNOWN_FAILURES.get((name, variant.name))
    if reason:
        raise InputError(
            f"{name} cannot be exported with {variant.name} (torch 2.13, onnxruntime 1.32): {reason}"
        )


def _export_torchscript(zoo: ZooModel, variant: ExportVariant, path: Path) -> None:
    import torch

    torch.onnx.export(
        zoo.module,
        zoo.example_inputs,
        str(path),
        dynamo=False,
        opset_version=variant.opset,
        input_names=list(zoo.input_names),
        output_names=list(zoo.output_names),
        dynamic_axes=zoo.dynamic_axes if variant.dynamic else None,
        do_constant_folding=variant.constant_folding,
        training=torch.onnx.TrainingMode.PRESERVE if variant.keep_bn else torch.onnx.TrainingMode.EVAL,
        keep_initializers_as_inputs=variant.initializers_as_inputs,
    )


def _export_dynamo(zoo: ZooModel, variant: ExportVariant, path: Path, large: bool) -> None:
    import torch

    # Named string axes: torch.export treats them as Dim.DYNAMIC (no range guesses to satisfy)
    # and the ONNX exporter writes the names into the graph's dims.
    dynamic_shapes = (
        tuple(dict(zoo.dynamic_axes.get(name, {})) for name in zoo.input_names) if variant.dynamic else None
    )
    torch.onnx.export(
        zoo.module,
        zoo.example_inputs,
        str(path),
        dynamo=True,
        opset_version=variant.opset,
        input_names=list(zoo.input_names),
        output_names=list(zoo.output_names),
        dynamic_shapes=dynamic_shapes,
        optimize=variant.optimize,
        external_data=large,
        verbose=False,
    )


def _publishable(path: Path) -> list[Path]:
    """The files of the export at ``path``, model first, with at most one data file.

    TorchScript writes a large model's tensors one file each; they are gathered into
    ``<name>.data`` (the name the dynamo exporter uses) in a subfolder of the staging folder.
    """
    data = path.with_name(path.name + ".data")
    others = {p for p in path.parent.iterdir() if p != path}
    if not others:
        return [path]
    if others == {data}:
        return [path, data]
    proto = onnx.load(str(path), load_external_data=True)
    gathered = path.parent / ".gathered"
    gathered.mkdir()
    onnx.save_model(
        proto,
        str(gathered / path.name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
    )
    return [gathered / path.name, gathered / data.name]


def _check_export(zoo: ZooModel, variant: ExportVariant, path: Path) -> None:
    """The exported file must pass onnx.checker, keep BatchNorms when asked, and have
    symbolic axes exactly where the variant wants them."""
    label = f"{zoo.name} exported with {variant.name}"
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as error:
        raise InputError(f"{label} fails onnx.checker: {first_line(error)}") from None
    model = ir.load(str(path))
    if variant.keep_bn:
        from torch import nn

        wanted = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in zoo.module.modules())
        found = sum(node.op_type == "BatchNormalization" for node in model.graph)
        if found != wanted:
            raise InputError(f"{label} holds {found} BatchNormalization nodes, not {wanted}")
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.name in model.graph.initializers:
            continue
        dims = value.shape.dims if value.shape is not None else ()
        symbolic = {i: dim.value for i, dim in enumerate(dims) if not isinstance(dim, int)}
        expected = dict(zoo.dynamic_axes.get(value.name, {})) if variant.dynamic else {}
        if symbolic != expected:
            raise InputError(f"{label}: {value.name} has symbolic axes {symbolic}, expected {expected}")


def _tensor_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
