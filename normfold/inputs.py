"""Inputs for checking a model: random ones shaped from the model, or a user's ``.npz``.

The inputs of a model are its graph inputs that have no initializer (old exporters list the
weights as inputs too; their default, the initializer, is what runs).

Shapes (:func:`generate_inputs`)
  1. A static dim is used as it is.
  2. A symbolic dim takes the value ``dims`` binds to its name; without one, a default chosen
     by name (case-insensitive): batch-like names (containing ``batch``, or exactly ``n``,
     ``b``, ``bs``, ``bsz``) get 2; sequence-like names (containing ``seq``, ``len``, ``token``,
     ``time``, or exactly ``s``, ``t``, ``l``) get 16; spatial names (containing ``height`` or
     ``width``, or exactly ``h``, ``w``) get 32; any other name gets 4. A symbol has one value
     in all inputs.
  3. An anonymous dim gets 2 on axis 0 (where the batch usually is) and 4 elsewhere.
  A ``dims`` key that names no symbolic dim of the model is an :class:`InputError`.

Values (sample ``k`` of a run uses ``seed + k``)
  1. Floating point (float32/64, float16, bfloat16, float8): standard normal, rounded to the
     input's dtype.
  2. A name containing ``mask`` (any dtype): 0/1 rows (over the last axis) of the form
     ``1…1 0…0``, each at least one 1 long; when a row has room, at least one row ends in
     zeros, so padding positions are exercised (that is where a lost eps shows).
  3. Bool: random.
  4. Integers whose name looks like ``position_ids``: ``arange`` over the last axis.
  5. Other integers that reach the indices of a ``Gather`` (through value-preserving ops:
     Cast, Identity, Unsqueeze, Squeeze, Reshape, Flatten, Transpose, Expand, Tile, Slice,
     Concat, Split, or the data side of another Gather) whose data has a known dim ``V`` on
     the gathered axis: uniform in ``[0, V)``, ``V`` the smallest over all such Gathers
     (token ids stay below the vocabulary). Position ids are reduced modulo that ``V`` too.
  6. Any other integer: uniform in ``[0, 2)``.
  Strings, sequences and inputs without a known rank cannot be generated (``InputError``:
  give them in an ``.npz``).

Files (:func:`load_inputs`, :func:`write_inputs`)
  One ``.npz`` holds one sample: one array per model input, keyed by the input's name, with
  the input's rank, static dims and dtype (bfloat16 arrays, which numpy stores as raw 2-byte
  void, are read back as bfloat16). Symbolic dims must agree across inputs. Every mismatch is
  an :class:`InputError` that names the file and the input. Several samples (what
  ``verify --save-inputs`` writes after three random draws) are keyed ``sample_K/NAME``, K
  from 0, every key so prefixed; each sample is checked on its own.
"""

from __future__ import annotations

__all__ = ["check_inputs", "generate_inputs", "load_inputs", "model_inputs", "resolve_dims", "write_inputs"]

import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx_ir as ir

from normfold.errors import InputError, first_line
from normfold.files import write_atomic

# The machine's physical memory: no generated input may need more.
_MAX_INPUT_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

_BATCH = re.compile(r"batch|^(n|b|bs|bsz)$", re.IGNORECASE)
_SEQUENCE = re.compile(r"seq|len|token|time|^(s|t|l)$", re.IGNORECASE)
_SPATIAL = re.compile(r"height|width|^(h|w)$", re.IGNORECASE)
_POSITION = re.compile(r"position|pos_?ids?$", re.IGNORECASE)

# Ops whose output holds (some of) the values of the input at that position, unchanged.
_VALUE_PRESERVING = {
    "Cast": (0,),
    "CastLike": (0,),
    "Identity": (0,),
    "Unsqueeze": (0,),
    "Squeeze": (0,),
    "Reshape": (0,),
    "Flatten": (0,),
    "Transpose": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "Slice": (0,),
    "Split": (0,),
    "Gather": (0,),
    "Concat": None,  # every input
}


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph inputs a caller must feed: those without an initializer."""
    return [value for value in model.graph.inputs if value.name not in model.graph.initializers]


def resolve_dims(model: ir.Model, dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """The value of every symbolic dim of the model's inputs: ``dims``, else the default rule."""
    symbols: list[str] = []
    for value in model_inputs(model):
        for dim in value.shape or ():
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in symbols:
                symbols.append(dim.value)
    dims = dict(dims or {})
    for key, size in dims.items():
        if key not in symbols:
            known = ", ".join(symbols) if symbols else "none"
            raise InputError(f"dims: {key!r} is not a symbolic dim of the model (its symbols: {known})")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise InputError(f"dims: {key}={size!r} must be a positive integer")
    return {symbol: int(dims[symbol]) if symbol in dims else _default_dim(symbol) for symbol in symbols}


def generate_inputs(
    model: ir.Model, *, dims: Mapping[str, int] | None = None, seed: int = 0, label: str = "<model>"
) -> dict[str, np.ndarray]:
    """Random inputs for ``model`` by the rules in the module docstring, reproducible by seed.

    Errors name the model as ``label``."""
    sizes = resolve_dims(model, dims)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model_inputs(model):
        dtype = _numpy_dtype(value, label)
        if value.shape is None:
            raise InputError(f"{label}: input {value.name!r} has no known rank; give its values with --inputs")
        shape = tuple(_dim_size(dim, axis, sizes) for axis, dim in enumerate(value.shape))
        _check_size(value.name, shape, dtype, label)
        feeds[value.name] = _sample(value, dtype, shape, rng)
    return feeds


def _check_size(name: str, shape: tuple[int, ...], dtype: np.dtype, label: str) -> None:
    """Refuse a declared shape no machine could hold, instead of a ``MemoryError`` halfway."""
    if any(size < 0 for size in shape):
        raise InputError(f"{label}: input {name!r} declares a negative dim {shape}")
    # Random floats are drawn in float64 before the cast: 8 bytes an element at the peak.
    needed = math.prod(shape) * max(dtype.itemsize, 8)
    if needed > _MAX_INPUT_BYTES:
        raise InputError(
            f"{label}: input {name!r} of shape {shape} would need {needed / 2**30:.3g} GiB, more than this "
            f"machine's memory ({_MAX_INPUT_BYTES / 2**30:.3g} GiB); give smaller sizes with --dims or --inputs"
        )


def load_inputs(path: str | Path, model: ir.Model) -> list[dict[str, np.ndarray]]:
    """The samples held in the ``.npz`` at ``path``, each checked against ``model``'s inputs."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{path}: not a readable .npz archive ({first_line(error)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: not an .npz archive (one array per model input)")
    try:
        feeds = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"{path}: cannot read the arrays ({first_line(error)})") from None
    finally:
        archive.close()
    samples = _split_samples(feeds)
    if samples is None:
        return [check_inputs(feeds, model, str(path))]
    return [check_inputs(sample, model, f"{path} sample {k}") for k, sample in enumerate(samples)]


def write_inputs(path: str | os.PathLike, samples: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """Write ``samples`` to an ``.npz`` :func:`load_inputs` reads back, atomically.

    One sample is written as it is (one array per input); several are keyed ``sample_K/NAME``.
    """
    if len(samples) == 1:
        arrays = dict(samples[0])
    else:
        arrays = {f"{_SAMPLE_PREFIX}{k}/{name}": array for k, sample in enumerate(samples) for name, array in sample.items()}
    return write_atomic(path, lambda file: _savez(file, arrays))


def _savez(file: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez(file, **arrays)`` writes, for any input name: as keywords, an input named
    ``file`` collides with savez's own parameter."""
    with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


_SAMPLE_PREFIX = "sample_"
_SAMPLE_KEY = re.compile(r"^sample_(\d+)/(.+)$")


def _split_samples(arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
    """The samples of a several-sample archive (keys ``sample_K/NAME``), None for one sample."""
    matches = [_SAMPLE_KEY.match(key) for key in arrays]
    if not arrays or not all(matches):
        return None
    count = 1 + max(int(m.group(1)) for m in matches if m)
    samples: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for key, match in zip(arrays, matches):
        if match:
            samples[int(match.group(1))][match.group(2)] = arrays[key]
    return samples


def check_inputs(feeds: Mapping[str, np.ndarray], model: ir.Model, label: str) -> dict[str, np.ndarray]:
    """``feeds`` as arrays fit for ``model``: every input present, right rank, dims and dtype."""
    inputs = model_inputs(model)
    wanted = {value.name for value in inputs}
    for name in feeds:
        if name not in wanted:
            why = (
                "is a weight (an initializer listed as input), not a model input"
                if name in model.graph.initializers
                else f"is not an input of the model (its inputs: {', '.join(sorted(wanted))})"
            )
            raise InputError(f"{label}: {name!r} {why}")
    missing = [value.name for value in inputs if value.name not in feeds]
    if missing:
        raise InputError(f"{label}: no values for model input(s) {', '.join(map(repr, missing))}")
    bound: dict[str, tuple[int, str]] = {}
    checked: dict[str, np.ndarray] = {}
    for value in inputs:
        array = np.asarray(feeds[value.name])
        dtype = _numpy_dtype(value, label)
        if array.dtype != dtype and array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
            array = array.view(dtype)  # numpy writes ml_dtypes arrays (bfloat16, ...) as raw void
        if array.dtype != dtype:
            raise InputError(f"{label}: input {value.name!r} has dtype {array.dtype} but the model wants {dtype}")
        if value.shape is not None:
            _check_shape(array.shape, value, bound, label)
        checked[value.name] = array
    return checked


def _check_shape(
    shape: tuple[int, ...], value: ir.Value, bound: dict[str, tuple[int, str]], label: str
) -> None:
    def wanted() -> str:
        parts = []
        for dim in value.shape:
            if isinstance(dim, int):
                parts.append(str(dim))
            elif dim.value and dim.value in bound:
                parts.append(f"{dim.value}={bound[dim.value][0]}")
            else:
                parts.append(dim.value or "?")
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"

    problem = len(shape) != len(value.shape)
    for size, dim in zip(shape, value.shape):
        if problem:
            break
        if isinstance(dim, int):
            problem = size != dim
        elif dim.value:
            problem = dim.value in bound and bound[dim.value][0] != size
    if problem:
        raise InputError(f"{label}: input {value.name!r} has shape {tuple(shape)} but the model wants {wanted()}")
    for size, dim in zip(shape, value.shape):
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            bound.setdefault(dim.value, (size, value.name))


def _default_dim(symbol: str) -> int:
    if _BATCH.search(symbol):
        return 2
    if _SEQUENCE.search(symbol):
        return 16
    if _SPATIAL.search(symbol):
        return 32
    return 4


def _dim_size(dim: int | ir.SymbolicDim, axis: int, sizes: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    if dim.value:
        return sizes[dim.value]
    return 2 if axis == 0 else 4


def _numpy_dtype(value: ir.Value, label: str) -> np.dtype:
    if not isinstance(value.type, ir.TensorType) or value.dtype is None:
        raise InputError(f"{label}: input {value.name!r} is not a tensor ({value.type}); normfold feeds tensors only")
    if value.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        raise InputError(f"{label}: input {value.name!r} has dtype {value.dtype.name}, which normfold cannot feed")
    return np.dtype(value.dtype.numpy())


def _sample(value: ir.Value, dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    name = value.name or ""
    if "mask" in name.lower():
        return _mask(shape, rng).astype(dtype)
    if value.dtype.is_floating_point():
        return rng.standard_normal(shape).astype(dtype)
    if value.dtype == ir.DataType.BOOL:
        return rng.integers(0, 2, size=shape).astype(bool)
    if not value.dtype.is_integer():
        raise InputError(f"input {name!r} has dtype {value.dtype.name}, which normfold cannot generate")
    bound = _gather_bound(value)
    if _POSITION.search(name):
        positions = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape)
        return (positions % bound if bound else positions).astype(dtype)
    return rng.integers(0, bound or 2, size=shape).astype(dtype)


def _mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if not shape:
        return np.ones((), dtype=np.int64)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    width = shape[-1]
    if rows == 0 or width == 0:
        return np.zeros(shape, dtype=np.int64)
    lengths = rng.integers(1, width + 1, size=rows)
    if width > 1 and lengths.min() == width:
        lengths[-1] = rng.integers(1, width)  # keep some padding positions
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return mask.reshape(shape)


def _gather_bound(value: ir.Value) -> int | None:
    """The smallest gathered-axis size of the Gathers whose indices ``value``'s values reach."""
    bound: int | None = None
    seen: set[int] = set()
    frontier = [value]
    while frontier:
        current = frontier.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for user, index in current.uses():
            if user.domain not in ("", "ai.onnx"):
                continue
            if user.op_type == "Gather" and index == 1:
                size = _gathered_size(user)
                if size is not None:
                    bound = size if bound is None else min(bound, size)
                continue
            positions = _VALUE_PRESERVING.get(user.op_type, ())
            if positions is None or index in positions:
                frontier.extend(output for output in user.outputs)
    return bound


def _gathered_size(node: ir.Node) -> int | None:
    data = node.inputs[0]
    if data is None:
        return None
    tensor = ir.convenience.get_const_tensor(data)
    shape = tuple(tensor.shape) if tensor is not None else data.shape
    if shape is None:
        return None
    axis_attr = node.attributes.get("axis")
    axis = axis_attr.as_int() if axis_attr is not None else 0
    if not -len(shape) <= axis < len(shape):
        return None
    size = shape[axis]
    return size if isinstance(size, int) and size > 0 else None
