"""Start-up: ``normfold --help``, ``normfold passes`` and usage errors import nothing heavy.

An export pipeline runs normfold on every model; answering a usage error or listing the passes
must not wait for onnxruntime, onnxscript or torch (seconds together). Every command runs in one
fresh interpreter, which then reports what it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("onnxruntime", "onnxscript", "torch")

# argv, expected exit code
COMMANDS = [
    (["--help"], 0),
    (["optimize", "--help"], 0),
    (["passes"], 0),
    ([], 2),
    (["optimize"], 2),
    (["optimize", "in.onnx"], 2),
    (["optimize", "in.onnx", "-o", "out.onnx", "--passes", "fold-everything"], 2),
    (["optimize", "in.onnx", "-o", "out.onnx", "--passes", "collapse"], 2),
    (["optimize", "in.onnx", "-o", "out.onnx", "--passes", ""], 2),
    (["optimize", "in.onnx", "-o", "out.onnx", "--dims", "batch"], 2),
    (["optimize", "-o", "out.onnx"], 2),
    (["optimize", "in.onnx", "-o", "out.onnx", "--target", "tpu"], 2),
    (["verify", "ref.onnx"], 2),
    (["verify", "ref.onnx", "cand.onnx", "--dims", "seq=0"], 2),
    (["inspect"], 2),
    (["collapse"], 2),
    (["nonsense"], 2),
]

_SCRIPT = """
import contextlib, io, json, sys
from normfold.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exit_:
            codes.append(exit_.code)
print(json.dumps({"codes": codes, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_help_passes_and_usage_errors_import_nothing_heavy(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([argv for argv, _ in COMMANDS])],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["codes"] == [code for _, code in COMMANDS]
    assert answer["heavy"] == []


def test_the_catalog_lists_every_registered_pass_in_order() -> None:
    """``normfold passes`` and ``--passes`` read the catalog: a pass missing from it would be
    neither listed nor run by default."""
    from normfold.catalog import BY_NAME, DEFAULT_PASSES
    from normfold.passes import REGISTRY

    assert list(BY_NAME) == list(REGISTRY)
    for name, cls in REGISTRY.items():
        assert (cls.summary, cls.exact) == (BY_NAME[name].summary, BY_NAME[name].exact), name
    assert DEFAULT_PASSES == tuple(name for name, cls in REGISTRY.items() if cls.exact)
