"""How a JAX model is loaded and run: dtype, quantization and decode kernels, checked once.

``get_model`` and the CLI turn their string arguments into one :class:`ModelOptions`; the
loaders, planner and executors receive that object and never parse strings again.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Model dtypes by name (``auto``: fp16 on accelerators, fp32 on CPU).
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: Short names accepted wherever a dtype is named.
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

#: Values of ``quantize=``: full precision or int8 weight-only matmul kernels.
QUANTIZE = (None, "int8")

#: The Pallas kernels a decode step can call (``optkit.parallel.kernels``).
PALLAS_KERNELS = ("attention", "matvec")
#: Values of ``kernels=`` besides kernel names joined by commas.
KERNEL_CHOICES = ("auto", "xla", "pallas")


def dtype_name(dtype) -> str:
    """The canonical name (one of :data:`DTYPES`) of a dtype given as a name, an alias, a
    numpy/JAX dtype or None (``auto``)."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)} "
                         f"(or {', '.join(DTYPE_ALIASES)})")
    return name


def resolve_dtype(dtype, platform: str):
    """The JAX dtype of ``dtype`` on ``platform`` (``auto``: fp16 off CPU, as Alpa)."""
    import jax.numpy as jnp

    name = dtype_name(dtype)
    if name == "auto":
        name = "float32" if platform == "cpu" else "float16"
    return jnp.dtype(name)


def check_quantize(quantize) -> str | None:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8'; got {quantize!r}")
    return quantize


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which Pallas kernels a decode step calls.

    ``names``: the kernels to use; ``required``: a kernel in ``names`` that cannot run is an
    error (it was asked for) rather than left to XLA (``auto``: on GPUs, where it applies).
    """

    names: frozenset = frozenset(PALLAS_KERNELS)
    required: bool = False

    def __post_init__(self):
        names = frozenset(self.names)
        unknown = sorted(names - set(PALLAS_KERNELS))
        if unknown:
            raise ValueError(f"unknown kernels {unknown}; the kernels are "
                             f"{', '.join(PALLAS_KERNELS)}")
        object.__setattr__(self, "names", names)

    @classmethod
    def parse(cls, choice: str, int8: bool = False) -> Kernels:
        """``auto``, ``xla`` (none), ``pallas`` (every kernel that applies to the model:
        the int8 products only for an ``int8`` one) or kernel names joined by commas."""
        if not isinstance(choice, str):
            raise TypeError(f"kernels must be a string or Kernels; got {type(choice).__name__}")
        text = choice.strip().lower()
        if text == "auto":
            return cls()
        if text == "xla":
            return cls(frozenset(), required=True)
        if text == "pallas":
            return cls(frozenset(n for n in PALLAS_KERNELS if int8 or n != "matvec"), True)
        names = [n.strip() for n in text.split(",")]
        if not all(n in PALLAS_KERNELS for n in names):
            raise ValueError(f"kernels={choice!r}: choose one of {', '.join(KERNEL_CHOICES)}, "
                             f"or names joined by commas from {', '.join(PALLAS_KERNELS)}")
        return cls(frozenset(names), required=True)

    def wants(self, kernel: str) -> bool:
        return kernel in self.names

    def __str__(self) -> str:
        if not self.required:
            return "auto"
        return ",".join(n for n in PALLAS_KERNELS if n in self.names) or "xla"


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a ``jax/`` or ``alpa/`` model is loaded and run.

    Args:
      dtype: ``auto`` (fp16 on GPUs, fp32 on CPU), ``float32``, ``float16`` or ``bfloat16``
        (aliases ``fp32``, ``fp16``, ``half``, ``bf16``).
      quantize: None or ``"int8"`` (int8 weight-only matmul kernels, ``optkit.quant``).
      kernels: a :class:`Kernels`, or its text form: ``"auto"`` (on GPUs, the kernels that
        apply), ``"xla"`` (none), ``"pallas"`` (all that apply), or names joined by commas
        from ``"attention"``, ``"matvec"`` (``optkit.parallel.kernels``).
    """

    dtype: str = "auto"
    quantize: str | None = None
    kernels: Kernels = Kernels()

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        check_quantize(self.quantize)
        kernels = self.kernels
        if not isinstance(kernels, Kernels):
            kernels = Kernels.parse(kernels, int8=self.int8)
        if kernels.wants("matvec") and kernels.required and not self.int8:
            raise ValueError(f"kernels={str(kernels)!r}: the matvec kernel runs int8 products "
                             "and the model is not int8; load it with quantize='int8'")
        object.__setattr__(self, "kernels", kernels)

    @property
    def int8(self) -> bool:
        return self.quantize == "int8"

    def replace(self, **kw) -> ModelOptions:
        return dataclasses.replace(self, **kw)
