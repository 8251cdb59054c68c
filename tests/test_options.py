"""The options objects: built once by the CLI's argument groups, taken by the Python API."""

from __future__ import annotations

import dataclasses

import pytest

import normfold
from normfold.cli import parser
from normfold.cli import options as cli_options
from normfold.errors import InputError
from normfold.options import PassOptions, VerifyOptions, split


def _args(*argv: str):
    return parser().parse_args(list(argv))


def test_every_option_field_is_a_flag_of_the_verbs_that_use_it() -> None:
    optimize = _args("optimize", "in.onnx", "-o", "out.onnx", "--target", "onnxruntime", "--max-opset", "17",
                     "--freeze-initializer-inputs", "--lower-standalone-bn", "--skip-ops",
                     "--inputs", "x.npz", "--samples", "5", "--rtol", "1e-3", "--atol", "1e-4",
                     "--save-inputs", "used.npz")
    assert cli_options.pass_options(optimize) == PassOptions("onnxruntime", 17, True, True, True)
    assert cli_options.verify_options(optimize) == VerifyOptions(
        inputs="x.npz", samples=5, rtol=1e-3, atol=1e-4, save_inputs="used.npz"
    )
    verify = _args("verify", "a.onnx", "b.onnx", "--dims", "batch=2,seq=16", "--reference", "float64", "--localize")
    assert cli_options.verify_options(verify) == VerifyOptions(
        dims={"batch": 2, "seq": 16}, reference_precision="float64", localize=True
    )
    # A field no flag sets would be an option the command line cannot reach.
    set_by_optimize = {f.name for f in dataclasses.fields(PassOptions)}
    assert set_by_optimize <= set(vars(optimize))
    reached = set(vars(optimize)) | set(vars(verify)) | {"seed"}  # seed: Python API only
    assert {f.name for f in dataclasses.fields(VerifyOptions)} <= reached


def test_a_bad_dims_value_is_a_usage_error_before_anything_loads() -> None:
    with pytest.raises(InputError, match="NAME=POSITIVE_INT"):
        cli_options.verify_options(_args("verify", "a.onnx", "b.onnx", "--dims", "batch:2"))


def test_keywords_go_to_the_options_object_that_has_the_field() -> None:
    passes, checks = split({"target": "onnxruntime", "rtol": 1e-3}, PassOptions(max_opset=17), VerifyOptions())
    assert passes == PassOptions(target="onnxruntime", max_opset=17) and checks == VerifyOptions(rtol=1e-3)
    with pytest.raises(TypeError, match="'tolerance'"):
        split({"tolerance": 1e-3}, PassOptions(), VerifyOptions())
    assert normfold.PassOptions is PassOptions and normfold.VerifyOptions is VerifyOptions
