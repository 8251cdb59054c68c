"""The inspect job: what ``optimize`` would do to a model, and what ``collapse`` could remove.

Nothing is verified or saved. The report is the optimize report without ``output`` (``input`` is
called ``model``), plus a ``collapse`` entry: every activation the approximate collapse pass
could linearize, with its score, and the refused ones with their reasons.
"""

from __future__ import annotations

__all__ = ["inspect"]

import math
from typing import Any

import onnx_ir as ir

from normfold import io
from normfold.jobs import common
from normfold.jobs.optimize import optimize
from normfold.options import split
from normfold.passes import PassOptions
from normfold.passes.collapse import COLLAPSE_SITES, CollapsePass
from normfold.verification import check_runs


def inspect(source: io.ModelLike, options: PassOptions | None = None, **settings: Any) -> dict[str, Any]:
    """What ``optimize`` would do to ``source``: its sites and refusals, nothing verified or saved.

    ``options`` (or its fields as keywords: ``target=``, ``max_opset=``) as for ``optimize``.
    The file is read once: optimize and the collapse survey each work on their own copy of it.
    The model must load and run once in onnxruntime, as ``optimize`` needs of its input: a file
    that optimize and verify refuse, inspect refuses too.
    """
    (options,) = split(settings, options or PassOptions())
    model, _ = common.working_copy(source)
    check_runs(model, common.source_label(source))
    result = optimize(model, options=options, verify=False)
    report = result.report
    del report["input"], report["output"]
    report = {"model": common.source_label(source), **report}
    report["collapse"] = _collapse_candidates(model, options)
    return report


def _collapse_candidates(source: ir.Model, options: PassOptions) -> dict[str, Any]:
    """What ``normfold collapse`` could remove: every mergeable activation with its score.

    Collapse is approximate, so it is never part of ``optimize``; inspect shows its candidates
    (all of them linearized at once, with the deviation that measures) and its refusals. A model
    with no rectifier is not run at all: the pass would only cost an onnxruntime session.
    """
    model = source.clone()
    if not any(node.op_type in COLLAPSE_SITES for node in model.graph.all_nodes()):
        return {"name": CollapsePass.name, "applied": 0, "sites": [], "refused": [],
                "notes": ["no ReLU-like activation: nothing to collapse"]}
    collapse = CollapsePass(options, max_deviation=math.inf)
    collapse(model)
    return {**collapse.record.to_dict(), "deviation": collapse.deviation}

