"""Notebook plumbing: the kernel, parameters, HTML, and the committed notebooks' shape."""

import ast
import sys

import nbformat
import pytest

from optkit.bench.report import (
    NOTEBOOKS,
    ensure_kernel,
    notebook_html,
    notebook_parameters,
    notebook_path,
    run_notebook,
)

ALL = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def test_kernel_runs_this_python():
    from jupyter_client.kernelspec import KernelSpecManager

    name = ensure_kernel()
    assert KernelSpecManager().get_kernel_spec(name).argv[0] == sys.executable
    assert ensure_kernel() == name  # idempotent


def test_all_notebooks_present():
    assert {"01_convert_weights", "03_benchmark_sweep", "04_interactive_generation",
            "05_serving_load"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_notebooks_are_thin_and_committed_without_outputs(name):
    nb = nbformat.read(notebook_path(name), as_version=4)
    assert nb.cells[0].cell_type == "markdown"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [] and cell.execution_count is None, "strip outputs"
        tree = ast.parse(cell.source)
        defs = [n for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef |
                              ast.Lambda)]
        assert not defs, f"{name} defines functions: notebooks only call optkit"
    # every parameter is a flat literal written `name: type = value  # help`, and papermill
    # reads each one (help text included)
    params = tagged[0].source.splitlines()
    declared = [ast.parse(line).body[0] for line in params]
    assert all(isinstance(d, ast.AnnAssign) for d in declared)
    for d in declared:
        ast.literal_eval(d.value)
    found = notebook_parameters(name)
    assert list(found) == [d.target.id for d in declared]
    assert all(info["help"] for info in found.values())


def test_unknown_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="has no parameters"):
        run_notebook("03_benchmark_sweep", tmp_path / "x.ipynb", {"modle": "opt-tiny"})
    with pytest.raises(FileNotFoundError, match="available"):
        notebook_path("99_missing")


def test_html_report_hides_code_and_embeds_images(tmp_path):
    nb = nbformat.v4.new_notebook()
    png = "iVBORw0KGgo="  # PNG magic, base64
    cell = nbformat.v4.new_code_cell("secret_code_here()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png,
                                                                 "text/plain": "fig"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), cell]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    html = notebook_html(path, tmp_path / "r.html").read_text()
    assert "data:image/png;base64," + png in html and "secret_code_here" not in html
    html = notebook_html(path, tmp_path / "r2.html", no_input=False).read_text()
    assert "secret_code_here" in html


def test_describe_run_says_what_was_measured():
    from optkit.bench.report import describe_run

    rows = [{"path": None, "prompt_len": 32, "new_tokens": 16, "jax_device": "cpu:cpu",
             "jax_device_count": 1, "torch_device": "cpu", "cpu": "EPYC", "cpu_count": 2,
             "python": "3.11", "jax": "0.10", "optkit": "0.1", "peak_gbyte_per_s": 12.5,
             "peak_tflops": 0.2, "load_avg_1m": load, "timestamp": f"2026-12-0{i}"}
            for i, load in ((1, 2.5), (2, 3.75))]
    text = describe_run(rows)
    assert "**random**" in text and "32 a row" in text and "16 tokens generated" in text
    assert "load average while measuring: 2.5–3.8 on 2 cores" in text
    assert "read bandwidth 12.5 GB/s" in text and "Name:" not in text
    assert text._repr_markdown_() == str(text)
    assert "from `/w`" in describe_run([{**rows[0], "path": "/w"}])
    with pytest.raises(ValueError, match="no rows"):
        describe_run([])
