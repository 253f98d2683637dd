"""Benchmarks: each is ``run_*(config) -> list of row dicts`` (full config, device, versions
in every row), with helpers to append rows to ``benchmarks/results/`` and summarize them.

``textgen``: end-to-end text generation, several backends side by side (``optkit bench
textgen``).
"""

from optkit.bench.textgen import (
    PROMPTS,
    TextgenConfig,
    generation_flops,
    run_textgen,
    summarize,
    summary_markdown,
    write_rows,
)

__all__ = ["PROMPTS", "TextgenConfig", "generation_flops", "run_textgen", "summarize",
           "summary_markdown", "write_rows"]
