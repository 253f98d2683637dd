"""ModelOptions: string options parsed and checked once into typed values."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from optkit.options import (
    PALLAS_KERNELS,
    Kernels,
    ModelOptions,
    dtype_name,
    resolve_dtype,
)


def test_dtype_names_and_aliases():
    for given, want in (("auto", "auto"), (None, "auto"), ("fp16", "float16"),
                        ("half", "float16"), ("BF16", "bfloat16"), ("fp32", "float32"),
                        (np.float16, "float16"), (jnp.bfloat16, "bfloat16"),
                        (jnp.dtype("float32"), "float32")):
        assert dtype_name(given) == want
    for bad in ("int8", "fp8", "", np.int32):
        with pytest.raises(ValueError, match="unknown dtype"):
            dtype_name(bad)
    assert resolve_dtype("auto", "cpu") == jnp.float32
    assert resolve_dtype("auto", "gpu") == jnp.float16
    assert resolve_dtype("bf16", "gpu") == jnp.bfloat16


def test_kernel_choices_resolve_to_named_sets():
    assert Kernels.parse("auto") == Kernels() and not Kernels().required
    assert set(Kernels().names) == set(PALLAS_KERNELS)
    assert Kernels.parse("xla") == Kernels(frozenset(), required=True)
    assert Kernels.parse("pallas").names == {"attention"}
    assert Kernels.parse("pallas", int8=True).names == {"attention", "matvec"}
    assert Kernels.parse(" Matvec,attention ").names == {"attention", "matvec"}
    for text in ("auto", "xla", "attention", "attention,matvec"):
        assert str(Kernels.parse(text)) == text
    for bad in ("flash", "norm", "attention,norm", "", "attention,"):
        with pytest.raises(ValueError, match="choose one of"):
            Kernels.parse(bad)
    with pytest.raises(ValueError, match="unknown kernels"):
        Kernels(frozenset({"flash"}))


def test_model_options_are_checked_once_and_frozen():
    o = ModelOptions(dtype="half", quantize="int8", kernels="pallas")
    assert o.dtype == "float16" and o.int8 and o.kernels.names == {"attention", "matvec"}
    assert ModelOptions(kernels=o.kernels, quantize="int8") == ModelOptions(
        quantize="int8", kernels="pallas")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.dtype = "float32"
    assert ModelOptions().kernels == Kernels() and ModelOptions().quantize is None
    with pytest.raises(ValueError, match="not int8"):
        ModelOptions(kernels="matvec")
    with pytest.raises(ValueError, match="None or 'int8'"):
        ModelOptions(quantize="int4")
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelOptions(dtype="float64")
    with pytest.raises(ValueError, match="not int8"):
        o.replace(quantize=None)
