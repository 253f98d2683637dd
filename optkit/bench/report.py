"""Run the notebooks headlessly (papermill) and turn an executed notebook into an HTML report.

* :func:`run_notebook` executes ``notebooks/NAME.ipynb`` with parameters injected after its
  ``parameters`` cell, on a Jupyter kernel of *this* Python (:func:`ensure_kernel` installs
  the kernelspec ``optkit`` into this environment's prefix on first use, so a fresh clone
  with only ``.venv`` works, and no user-level kernel is needed or used);
* :func:`notebook_html` renders an executed notebook to a self-contained HTML page
  (nbconvert; code cells hidden by default, plots embedded);
* :func:`make_report` = both for the benchmark sweep notebook: CSV, JSONL and PNGs (written
  by the notebook), the executed ``report.ipynb`` and ``report.html`` in one folder.
  ``optkit bench report`` and ``make demo`` call it;
* :func:`describe_run` — what a report's rows were measured on, as markdown: the weights
  (random or from where), the prompts, device, software, measured peaks and load average.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

#: The repository's notebooks (next to the ``optkit`` package in a source checkout).
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SWEEP_NOTEBOOK = "03_benchmark_sweep"
KERNEL = "optkit"


def notebook_path(name: str | os.PathLike) -> Path:
    """``03_benchmark_sweep`` (or a path) -> the notebook file."""
    p = Path(name)
    if p.suffix != ".ipynb":
        p = p.with_suffix(".ipynb")
    for candidate in (p, NOTEBOOKS / p.name):
        if candidate.is_file():
            return candidate.resolve()
    have = sorted(q.stem for q in NOTEBOOKS.glob("*.ipynb")) if NOTEBOOKS.is_dir() else []
    raise FileNotFoundError(f"notebook {name} not found (looked in . and {NOTEBOOKS}); "
                            f"available: {', '.join(have) or 'none'}")


def _spec_python(name: str) -> str | None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec(name).argv
    except NoSuchKernel:
        return None
    return argv[0] if argv else None


def ensure_kernel(name: str = KERNEL) -> str:
    """The name of a kernelspec that runs this very interpreter (``sys.executable``),
    installing it into ``sys.prefix`` (or the user's Jupyter dir if that is read-only).
    If another environment's kernel already owns ``name``, a name derived from this
    interpreter's path is used instead."""
    from ipykernel.kernelspec import install

    if _spec_python(name) == sys.executable:
        return name
    if _spec_python(name) is not None:
        name = f"{name}-{hashlib.sha1(sys.executable.encode()).hexdigest()[:8]}"
        if _spec_python(name) == sys.executable:
            return name
    display = f"Python ({Path(sys.prefix).name}, optkit)"
    try:
        install(kernel_name=name, display_name=display, prefix=sys.prefix)
    except OSError:
        install(kernel_name=name, display_name=display, user=True)
    if _spec_python(name) != sys.executable:
        raise RuntimeError(f"installed the kernel {name!r} but Jupyter resolves it to "
                           f"{_spec_python(name)}, not {sys.executable}")
    return name


def notebook_parameters(name: str | os.PathLike) -> dict[str, dict]:
    """The notebook's parameters: name -> {default, type, help} (from its ``parameters``
    cell, written ``name: type = value  # help``)."""
    import papermill

    params = papermill.inspect_notebook(str(notebook_path(name)))
    return {k: {"default": v["default"], "type": v["inferred_type_name"], "help": v["help"]}
            for k, v in params.items()}


def run_notebook(name: str | os.PathLike, output: str | os.PathLike,
                 parameters: dict[str, Any] | None = None, kernel_name: str | None = None,
                 cwd: str | os.PathLike | None = None, progress: bool = False,
                 echo: bool = False, timeout: float | None = None):
    """Execute a notebook with ``parameters``; writes the executed copy to ``output`` and
    returns it (an ``nbformat`` node).  Unknown parameter names are an error.  ``cwd``
    (default: the current directory) is where relative paths in the notebook resolve;
    ``echo`` copies what the cells print to this process's stdout / stderr as they run."""
    import papermill

    path = notebook_path(name)
    parameters = dict(parameters or {})
    known = notebook_parameters(path)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(f"{path.name} has no parameters {unknown}; it takes: "
                         f"{', '.join(known)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    kw = {"execution_timeout": timeout} if timeout else {}
    kernel = kernel_name or ensure_kernel()
    with _same_optkit():
        return papermill.execute_notebook(
            str(path), str(output), parameters=parameters, kernel_name=kernel,
            cwd=str(cwd or Path.cwd()), progress_bar=progress,
            stdout_file=sys.stdout if echo else None, stderr_file=sys.stderr if echo else None,
            start_timeout=300, **kw)  # a kernel starts slowly on a busy machine


@contextlib.contextmanager
def _same_optkit():
    """Let the kernel import the optkit that launched it (first on its PYTHONPATH), whatever
    its working directory."""
    import optkit

    root = str(Path(optkit.__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def notebook_html(notebook: str | os.PathLike, html: str | os.PathLike,
                  no_input: bool = True) -> Path:
    """Render an executed notebook to one HTML file (code hidden unless ``no_input=False``;
    images are embedded)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=no_input, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    exporter.log.setLevel(logging.ERROR)  # not a warning per plot without alt text
    body, _ = exporter.from_filename(str(notebook))
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(body)
    return html


def make_report(output_dir: str | os.PathLike = "build/report",
                parameters: dict[str, Any] | None = None, notebook: str = SWEEP_NOTEBOOK,
                no_input: bool = True, progress: bool = True, **run_kw) -> dict[str, Path]:
    """Run ``notebook`` (default: the benchmark sweep) with ``parameters`` and
    ``output_dir`` injected, then write ``report.ipynb`` and ``report.html`` there.
    Returns the paths of everything in the folder by name."""
    out = Path(output_dir)
    params = {**(parameters or {})}
    if "output_dir" in notebook_parameters(notebook):
        params.setdefault("output_dir", str(out))
    executed = out / "report.ipynb"
    run_notebook(notebook, executed, params, progress=progress, **run_kw)
    notebook_html(executed, out / "report.html", no_input=no_input)
    return {p.name: p for p in sorted(out.iterdir()) if p.is_file()}


class Markdown(str):
    """Text that Jupyter front ends (and nbconvert's HTML) render as markdown."""

    def _repr_markdown_(self) -> str:
        return str(self)


def describe_run(rows) -> Markdown:
    """The conditions of benchmark rows (``run_benchmark`` rows, a DataFrame or a results
    file) as a short markdown list."""
    import pandas as pd

    from optkit.bench.results import read_rows

    df = read_rows(rows) if isinstance(rows, str | os.PathLike) else pd.DataFrame(rows)
    if df.empty:
        raise ValueError("no rows to describe")

    def have(col):
        return col in df and df[col].notna().any()

    def first(col):
        return df[col].dropna().iloc[0]

    paths = sorted({str(p) for p in df["path"].dropna() if p}) if have("path") else []
    if not paths:
        weights = ("**random** (`dummy=True`, seeded): the timings are real, the generated "
                   "text means nothing")
    elif df["path"].isna().any():
        weights = f"from `{'`, `'.join(paths)}` for some rows, random for the others"
    else:
        weights = f"from `{'`, `'.join(paths)}`"
    lines = [f"* Weights: {weights}."]
    if have("prompt_len"):
        lines.append(f"* Prompts: random token ids, {int(first('prompt_len'))} a row; "
                     f"{int(first('new_tokens'))} tokens generated a row, EOS ignored.")
    if have("jax_device"):
        dev = f"* Device: JAX `{first('jax_device')}`"
        if have("jax_device_count"):
            dev += f" ({int(first('jax_device_count'))} visible)"
        if have("torch_device"):
            dev += f", torch `{first('torch_device')}`"
        if have("cpu"):
            dev += f"; CPU {first('cpu')}"
            if have("cpu_count"):
                dev += f" ({int(first('cpu_count'))} cores)"
        lines.append(dev + ".")
    versions = [f"{k} {first(k)}" for k in ("python", "jax", "torch", "transformers",
                                            "optkit") if have(k)]
    if versions:
        lines.append(f"* Software: {', '.join(versions)}.")
    if have("peak_gbyte_per_s") and have("peak_tflops"):
        lines.append(f"* Measured peaks: read bandwidth {first('peak_gbyte_per_s'):.1f} GB/s, "
                     f"matmul {first('peak_tflops'):.3g} TFLOP/s.")
    if have("load_avg_1m"):
        lo, hi = df["load_avg_1m"].min(), df["load_avg_1m"].max()
        cores = f" on {int(first('cpu_count'))} cores" if have("cpu_count") else ""
        lines.append(f"* 1-minute load average while measuring: {lo:.1f}–{hi:.1f}{cores} "
                     "(other work on the machine slows the timings).")
    if have("timestamp"):
        lines.append(f"* Run: {df['timestamp'].min()} to {df['timestamp'].max()} (UTC).")
    return Markdown("\n".join(lines) + "\n")
