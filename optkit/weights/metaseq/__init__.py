"""Metaseq (Meta's original) OPT checkpoints: streaming import and a synthetic writer.

* :func:`convert_metaseq` — any released layout (OPT-175B's 992 FSDP x MP shards, the
  ``reshard-model_part-*.pt`` parts of both releases, 350m's ``reshard.pt``, a consolidated
  file) -> Alpa-layout weight folder, one tensor at a time in bounded memory.
* :func:`open_metaseq` — detect the layout and config, validate every file; reads no weights.
* :func:`write_synthetic_metaseq` — write any of those layouts from random or given weights.
* :func:`verify_md5` / :func:`write_md5_csv` — Meta's md5 sums files.

Modules: ``torchfile`` (lazy, safe torch-file reader), ``format`` (names, flat layout, MP
rules), ``reader`` (files -> per-part tensors), ``consolidate`` (glue parts per tensor),
``convert``, ``synthetic``, ``md5``, ``reference`` (naive load-everything consolidation, the
independent check used by tests and the benchmark baseline).
"""

from optkit.weights.metaseq.convert import convert_metaseq
from optkit.weights.metaseq.md5 import read_md5_csv, verify_md5, write_md5_csv
from optkit.weights.metaseq.reader import LAYOUTS, MetaseqCheckpoint, open_metaseq
from optkit.weights.metaseq.synthetic import SYNTHETIC_LAYOUTS, write_synthetic_metaseq

__all__ = [
    "LAYOUTS", "SYNTHETIC_LAYOUTS", "MetaseqCheckpoint", "convert_metaseq", "open_metaseq",
    "read_md5_csv", "verify_md5", "write_md5_csv", "write_synthetic_metaseq",
]
