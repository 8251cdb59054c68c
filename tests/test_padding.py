"""The one padding rule (normfold.math.padding) against onnxruntime's and torch's convolutions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normfold.errors import Refusal
from normfold.math.padding import conv_pads, symmetric, torch_conv_pads
from normfold.runtime import run


def _conv(auto_pad: str, pads: list[int] | None, weight: np.ndarray, strides: list[int], dilations: list[int],
          size: list[int]):
    attrs = {"auto_pad": auto_pad, "strides": strides, "dilations": dilations}
    if pads is not None:
        attrs["pads"] = pads
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=40, deadline=None)
@given(
    auto_pad=st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"]),
    rank=st.integers(1, 2),
    data=st.data(),
)
def test_auto_pad_is_the_explicit_padding_onnxruntime_applies(auto_pad: str, rank: int, data) -> None:
    kernel = data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    strides = data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    # onnxruntime refuses dilations with SAME_*; torch's 'same' checks those (test below).
    dilations = data.draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank)) if auto_pad == "VALID" else [1] * rank
    size = [data.draw(st.integers((k - 1) * d + 1, 9)) for k, d in zip(kernel, dilations)]
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(1, 1, *kernel)).astype(np.float32)
    x = rng.normal(size=(1, 1, *size)).astype(np.float32)
    pads = conv_pads(auto_pad, None, kernel, strides=strides, dilations=dilations, input_size=size)
    implicit = run(_conv(auto_pad, None, weight, strides, dilations, size), {"x": x})["y"]
    explicit = run(_conv("NOTSET", list(pads), weight, strides, dilations, size), {"x": x})["y"]
    np.testing.assert_allclose(explicit, implicit, rtol=1e-6, atol=1e-6)  # float32: ORT has no double Conv


def test_same_padding_needs_the_input_size_only_with_a_stride() -> None:
    assert conv_pads("SAME_UPPER", None, [4], dilations=[1]) == (1, 2)
    assert conv_pads("SAME_LOWER", None, [4], dilations=[1]) == (2, 1)
    assert conv_pads("SAME_UPPER", None, [1, 1]) == (0, 0, 0, 0)  # a 1x1 kernel pads nothing
    assert conv_pads("SAME_UPPER", None, [3], strides=[2]) is None
    assert conv_pads("SAME_UPPER", None, [3], strides=[2], input_size=[None]) is None
    assert conv_pads("NOTSET", None, [3, 3]) == (0, 0, 0, 0)
    assert conv_pads("NOTSET", [1, 0, 2, 0], [3, 3]) == (1, 0, 2, 0)
    with pytest.raises(Refusal, match="auto_pad=SAME"):
        conv_pads("SAME", None, [3])


# torch warns that an even kernel makes it pad a copy of the input: that asymmetric case is the point.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (4, 1), (4, 2), (2, 3)])
def test_torch_same_padding_is_same_upper(kernel: int, dilation: int) -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(1, 1, 11, dtype=torch.float64)
    weight = torch.randn(1, 1, kernel, dtype=torch.float64)
    pads = torch_conv_pads("same", (kernel,), (dilation,))
    padded = torch.nn.functional.pad(x, (pads[0], pads[1]))
    expected = torch.nn.functional.conv1d(x, weight, padding="same", dilation=dilation)
    torch.testing.assert_close(torch.nn.functional.conv1d(padded, weight, dilation=dilation), expected, rtol=0, atol=0)
    assert torch_conv_pads("valid", (kernel,), (dilation,)) == (0, 0)
    assert torch_conv_pads((2, 1), (kernel, kernel), (1, 1)) == (2, 1, 2, 1)


def test_symmetric() -> None:
    assert symmetric((1, 2, 1, 2)) == (1, 2)
    assert symmetric((1, 2, 2, 1)) is None
