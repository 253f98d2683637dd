"""Every shell command in README.md's ```bash blocks runs, so an example cannot rot.

Convention: a command (lines joined at a trailing backslash) runs unless its comment says
``needs: WHAT`` (a GPU, a Ray cluster, real weights, a running server, a long time, ...);
those are reported as skipped with that reason. The commands run in README order, in one
temporary folder that is also ``$HOME``, with this environment's ``optkit`` first on
``PATH``, the Hugging Face Hub offline and empty caches. Inputs a README command names as a
placeholder get a tiny stand-in first (:data:`STAND_INS`).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optkit.config import TINY

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS = re.compile(r"\bneeds:\s*([^;]*)")

pytestmark = pytest.mark.xdist_group("readme")


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) at the first ``#`` outside quotes that starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def readme_commands(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, command, reason it is skipped or None) for each command of the
    README's bash blocks; a backslash-continued command's comments are all read."""
    out, block, pending = [], False, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        command, comment = split_comment(line)
        if pending is None:
            if not command.strip():
                continue
            pending = [number, "", []]
        pending[2].append(comment)
        if command.endswith("\\"):
            pending[1] += command[:-1].rstrip() + " "
            continue
        pending[1] += command.strip()
        reasons = [m[1].strip() for c in pending[2] if (m := NEEDS.search(c))]
        out.append((pending[0], pending[1].strip(), reasons[0] if reasons else None))
        pending = None
    return out


COMMANDS = readme_commands(README.read_text())


def tiny_hf_checkpoint(path: Path) -> None:
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    OPTForCausalLM(HFConfig(**TINY.to_hf_dict())).save_pretrained(path)


#: Placeholder inputs of README commands -> a function writing a tiny stand-in there.
STAND_INS = {"path/to/hf-opt-1.3b": tiny_hf_checkpoint}


# One folder for every command (a command that needs another's output is joined to it with
# `&&` in the README: tests may run in any order).
@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    for rel, make in STAND_INS.items():
        make(work / rel)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OPTKIT_"))}
    env.update(HOME=str(work), HF_HOME=str(work / ".hf"), HF_HUB_OFFLINE="1",
               OPTKIT_CACHE=str(work / ".optkit"), JAX_PLATFORMS="cpu",
               OMP_WAIT_POLICY="PASSIVE",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # the commands see the machine's devices, as a user's do
    return work, env


def test_readme_has_commands_to_run():
    runnable = [c for c in COMMANDS if c[2] is None]
    assert len(runnable) >= 5 and any(c[1].startswith("optkit generate") for c in runnable)
    for number, _, reason in COMMANDS:
        assert reason != "", f"README.md:{number}: 'needs:' without a reason"


def test_split_comment():
    assert split_comment('optkit x --a "b # c"  # needs: gpu') == ('optkit x --a "b # c"',
                                                                   "needs: gpu")
    assert split_comment("make demo") == ("make demo", "")
    (c,) = readme_commands("```bash\noptkit a \\\n  --b 1   # c; needs: a GPU\n```\n")
    assert c == (2, "optkit a --b 1", "a GPU")
    (c,) = readme_commands("```bash\noptkit a   # needs:\n```\n")
    assert c == (2, "optkit a", "")


@pytest.mark.parametrize("number,command,reason", COMMANDS,
                         ids=[f"README.md:{n}" for n, _, _ in COMMANDS])
def test_readme_command(workdir, number, command, reason):
    if reason:
        pytest.skip(f"needs: {reason}")
    work, env = workdir
    p = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True,
                       text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, (f"README.md:{number}: `{command}` exited {p.returncode}\n"
                               f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
