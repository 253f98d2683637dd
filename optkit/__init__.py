"""optkit: serve, parallelize and benchmark OPT language models on JAX."""

from optkit.api import get_model
from optkit.config import PRESETS, OPTConfig
from optkit.version import __version__
from optkit.weights.tokenizer import get_tokenizer

__all__ = ["OPTConfig", "PRESETS", "__version__", "get_model", "get_tokenizer"]
