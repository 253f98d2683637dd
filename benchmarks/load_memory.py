"""Host memory while loading a weight folder under parallel plans (sharded loading).

For each plan a fresh child process with 8 fake CPU devices loads a random fp16 folder with
``get_model("alpa/...", plan=...)`` (each device's slice read from the memory-mapped files
through ``jax.make_array_from_callback``), and, for comparison, ``naive``: every tensor read
whole into host memory first (a state dict), then placed with the same shardings.

Fake CPU devices keep their buffers in host memory, so the process must at least hold what
the devices hold (*device bytes*: the model once for tensor parallel, plus the tied LM head
copy for pipelines, ``dp`` times with data parallel).  What sharded loading must avoid is
anything on top: *overhead* = peak growth of anonymous memory (``RssAnon``, sampled from
``/proc/self/status`` every 5 ms) - device bytes.  Mapped file pages (``RssFile``: the
memory-mapped weight files, i.e. page cache, reclaimable; XLA:CPU may even use such pages as
device buffers without a copy, which makes the overhead negative) are reported apart, as is
the growth of ``VmHWM`` (the kernel's peak resident set, file pages included).  The folder
is evicted from the page cache (``posix_fadvise(DONTNEED)``) before each run.

Usage::

    python benchmarks/load_memory.py                    # the committed run (opt-1.3b)
    python benchmarks/load_memory.py --model opt-125m   # quick check

Writes ``{out}.csv`` and ``{out}.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
PLANS = ["dp=1,tp=1,pp=1", "tp=8", "tp=4,pp=2", "pp=8", "dp=2,tp=4"]

CHILD = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out

import jax, numpy as np
from optkit import get_model
from optkit.parallel import Plan
from optkit.parallel.build import param_shardings
from optkit.weights.folder import FolderStore
from optkit.weights.layout import param_specs, tree_from_specs
jax.devices()
before = status()
peak = dict(before)
done = threading.Event()
def poll():
    while not done.is_set():
        s = status()
        for k in ("RssAnon", "RssFile", "VmRSS"):
            peak[k] = max(peak[k], s[k])
        time.sleep(0.005)
t = threading.Thread(target=poll, daemon=True); t.start()
t0 = time.perf_counter()
plan = Plan.parse({plan!r}).replace(dtype="float16")
if {method!r} == "sharded":
    m = get_model("alpa/opt-x", path={folder!r}, plan=plan, progress=False)
    params = m.executor.params
else:
    store = FolderStore({folder!r})
    cfg = store.config()
    state = {{k: np.array(store[k]) for k in store}}          # the whole state dict in memory
    sharding_for = param_shardings(cfg, plan, jax.devices())
    def put(spec):
        full = np.asarray(spec.read(state, tuple(slice(None) for _ in spec.shape)), np.float16)
        return jax.device_put(full, sharding_for(spec))
    params = tree_from_specs(param_specs(cfg), put)
jax.block_until_ready(params)
wall = time.perf_counter() - t0
done.set(); t.join()
device = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
print(json.dumps({{"before": before, "peak": peak, "vmhwm": status()["VmHWM"],
                  "device_bytes": device, "wall_s": wall}}))
"""


def markdown(df: pd.DataFrame) -> str:
    def cell(x):
        return f"{x:,.3f}" if isinstance(x, float) and abs(x) < 1 else (
            f"{x:,.1f}" if isinstance(x, float) else str(x))
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def evict(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--folder", default=str(ROOT / "build" / "load-memory"),
                    help="where the random weight folder is written (reused if present)")
    ap.add_argument("--plans", nargs="+", default=PLANS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory"))
    args = ap.parse_args()

    import jax
    import numpy as np

    from optkit.config import OPTConfig
    from optkit.weights.random import write_random_folder

    cfg = OPTConfig.from_name(args.model)
    folder = Path(args.folder) / f"opt-x-np-{cfg.name}"
    if not folder.is_dir():
        write_random_folder(folder, cfg, dtype=np.float16)
    model_bytes = sum(f.stat().st_size for f in folder.iterdir() if not f.name.endswith("json"))
    largest = max(f.stat().st_size for f in folder.iterdir())
    link = Path(args.folder) / "opt-x-np"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(folder.name)

    rows = []
    for plan in args.plans:
        for method in ("sharded", "naive"):
            evict(folder)
            code = CHILD.format(root=str(ROOT), plan=plan, method=method, folder=str(link))
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            grown = r["vmhwm"] - r["before"]["VmRSS"]
            anon = r["peak"]["RssAnon"] - r["before"]["RssAnon"]
            over = anon - r["device_bytes"]
            rows.append({
                "model": cfg.name, "plan": plan, "method": method,
                "model_mib": model_bytes / MiB, "largest_tensor_mib": largest / MiB,
                "device_mib": r["device_bytes"] / MiB,
                "rss_before_mib": r["before"]["VmRSS"] / MiB,
                "peak_rss_growth_mib": grown / MiB,
                "peak_anon_growth_mib": anon / MiB,
                "peak_file_mib": r["peak"]["RssFile"] / MiB,
                "overhead_mib": over / MiB,
                "overhead_vs_model": over / model_bytes, "wall_s": r["wall_s"]})
            print(f"{plan:>16} {method:>8}: device {r['device_bytes'] / MiB:8.0f} MiB, "
                  f"overhead {over / MiB:8.1f} MiB, {r['wall_s']:.1f} s", file=sys.stderr)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(f"{out}.csv", index=False, float_format="%.4g")
    cmd = "python benchmarks/load_memory.py" + (
        "" if args.model == "opt-1.3b" else f" --model {args.model}")
    md = [f"# Host memory while loading {cfg.name} (fp16, {model_bytes / MiB:,.0f} MiB) "
          f"under parallel plans\n",
          f"`{cmd}` on CPU, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"jax {jax.__version__}, 8 fake CPU devices, {time.strftime('%Y-%m-%d')}. "
          f"See the script's docstring for the method. MiB per column; *overhead* = peak growth "
          f"of anonymous memory while loading - bytes the devices hold (fake CPU devices keep "
          f"their buffers in host memory); *peak_file* = mapped weight-file pages (page cache). "
          f"The largest single tensor is {largest / MiB:,.0f} MiB. *naive* places every "
          f"parameter once (pipelines: no copy of the tied LM head on the last stage).\n",
          markdown(df.drop(columns=["model", "model_mib", "largest_tensor_mib"])), ""]
    Path(f"{out}.md").write_text("\n".join(md))
    print(f"wrote {out}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
