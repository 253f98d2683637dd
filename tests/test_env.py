"""The environments optkit is installed into: `make`'s and environment.yml's are the same, and
the package itself needs only its base dependencies."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
#: ``make -n`` as a user runs it: under ``make test`` (CI) the inherited MAKEFLAGS/MAKELEVEL
#: would make it a sub-make that prints "Entering directory" lines.
MAKE_N = ["make", "--no-print-directory", "-n"]
ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: list[str]) -> set[str]:
    """pyproject's requirement strings for the base install plus ``extras``."""
    reqs = set(PYPROJECT["dependencies"])
    for extra in extras:
        reqs |= set(PYPROJECT["optional-dependencies"][extra])
    return {str(Requirement(r)) for r in reqs}


def install_targets(args: list[str]) -> list[str]:
    """The editable targets of pip arguments (``-e ".[dev,cpu]"`` -> ``[".[dev,cpu]"]``)."""
    return [args[i + 1] for i, a in enumerate(args) if a == "-e"]


def extras_of(target: str) -> list[str]:
    m = re.fullmatch(r"\.\[([\w,]+)\]", target)
    assert m, f"expected an editable install of this checkout, got {target!r}"
    return sorted(m[1].split(","))


def test_make_and_environment_yml_install_the_same(tmp_path):
    # what `make install` runs for a new environment, as make itself expands it
    plan = subprocess.run([*MAKE_N, "install", f"VENV={tmp_path / 'env'}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, check=True).stdout
    make_targets = [t for line in plan.splitlines() if " pip install " in line
                    and "-U pip" not in line for t in install_targets(shlex.split(line))]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    yml_targets = [t for line in pip for t in install_targets(shlex.split(line))]
    assert len(make_targets) == len(yml_targets) == 1, (make_targets, yml_targets)
    make_extras, yml_extras = extras_of(make_targets[0]), extras_of(yml_targets[0])
    assert make_extras == yml_extras
    assert requirements(make_extras) == requirements(yml_extras)
    assert "torch==2.13.0" in requirements(yml_extras)  # the CPU wheel, not a CUDA build
    # conda's Python satisfies the package's
    (python,) = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    lowest = PYPROJECT["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, lowest.split(".")))


def test_make_uses_an_existing_environment(tmp_path):
    """`make ... VENV=$CONDA_PREFIX` installs into that environment and never makes a venv
    over it."""
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    plan = subprocess.run([*MAKE_N, "test", f"VENV={env}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, check=True).stdout
    lines = plan.splitlines()
    assert lines[0].startswith(f"test -x {env}/bin/python ||")
    assert any(line.startswith(f"{env}/bin/python -m pip install") for line in lines)
    assert any(line.startswith(f"{env}/bin/python -m pytest") for line in lines)
    made = subprocess.run(["sh", "-c", lines[0]], capture_output=True, text=True)
    assert made.returncode == 0 and not (env / "pyvenv.cfg").exists()


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules outside the standard library that optkit's files import (lazily
    or not) -> the files."""
    found: dict[str, set[str]] = {}
    for f in sorted((ROOT / "optkit").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("optkit", "__future__"):
                    found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


#: Modules an extra provides -> the extra, and the only package folder that may import it.
EXTRA_IMPORTS = {"ray": ("ray", "optkit/distributed/")}


def test_every_import_is_a_declared_dependency():
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    base = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    for module, files in third_party_imports().items():
        if module in EXTRA_IMPORTS:
            extra, folder = EXTRA_IMPORTS[module]
            assert module in {Requirement(r).name for r in
                              PYPROJECT["optional-dependencies"][extra]}
            assert all(f.startswith(folder) for f in files), (module, files)
            continue
        names = {canonicalize_name(d) for d in dists.get(module, [module])}
        assert names & base, f"{module} (imported by {sorted(files)}) is not a base dependency"


def test_main_modules_import_without_extras_or_dev_tools():
    """Importing the package's entry points (and building the CLI) loads no package of an
    extra or of the dev tools."""
    blocked = ["ray", "jupyterlab", "pytest", "scipy", "openai", "playwright", "ruff"]
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # any import of it raises ImportError
import optkit, optkit.api, optkit.cli, optkit.generation, optkit.parallel, optkit.serve
import optkit.bench, optkit.weights.hub, optkit.weights.convert, optkit.notebook
optkit.cli.build_parser()
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                            "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_notebooks_name_the_optkit_kernel():
    """The kernel `make lab` installs; papermill runs are given it explicitly."""
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        meta = json.loads(nb.read_text())["metadata"]
        assert meta["kernelspec"]["name"] == "optkit", nb.name
