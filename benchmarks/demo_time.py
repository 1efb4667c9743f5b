"""The demo's wall time: ``rlhf run`` (the tiny profile) from start to summary, beside another revision.

Each run is the command a user types (``rlhf run``, the KFP local runner, MLflow on SQLite), with its own
tracking store and run directory (a fresh registry each time, so the gate's champion comparison is not
against an earlier run's champion) and ``--set model.seed=S --set sft.seed=S --set reward.seed=S --set
ppo.seed=S`` per seed. With ``--peer REV`` the same runs are made on that revision of this repository (a git
worktree under ``--work``, the same virtualenv and raw data, ``PYTHONPATH`` pointing at its ``src``),
alternating ours and the peer's per seed, so a slower or faster spell of the machine touches both.

The machine's fp32 matmul rate (``benchmarks/machine.py``) is measured at the start and the end: this
machine's speed varies by a quarter from hour to hour, so absolute times are comparable only beside it.

Reported per run: the pipeline's wall time (the summary's), the steps' compute (training loops) and overhead
(start-up and imports, model loading, evaluation, saving, tracking), each stage's wall time, the gate, and
the learning outcome (gold of the PPO policy vs the SFT policy on the eval prompts). Then mean wall times
and the ratio peer / ours. The 1-minute load average at each start is printed: measure on an idle machine.

    .venv/bin/python benchmarks/demo_time.py [--seeds 0 1 2] [--peer REV] [--work /tmp/rlhf-demo-time]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean

from machine import matmul_gflops  # benchmarks/machine.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "validate", "sft", "reward", "ppo", "evaluate", "register")


def checkout(rev: str, work: Path) -> Path:
    """A worktree of ``rev`` whose data/raw is ours (the same bytes, the same data.dvc hash)."""
    tree = work / f"peer-{rev.replace('/', '_')}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
    raw = tree / "data" / "raw"
    if not raw.exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.symlink_to((ROOT / "data" / "raw").resolve(), target_is_directory=True)
    return tree


def one_run(tree: Path, seed: int, out: Path) -> dict:
    """``rlhf run`` in ``tree`` with its own tracking store under ``out``; the summary plus the load average."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONPATH": str(tree / "src"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RLHF_TRACKING", None)
    load = os.getloadavg()[0]
    sets = [a for s in ("model", "sft", "reward", "ppo") for a in ("--set", f"{s}.seed={seed}")]
    proc = subprocess.run([str(bin_dir / "rlhf"), "run", "--runs-dir", str(out / "runs"), *sets], cwd=tree,
                          env=env, capture_output=True, text=True)
    (out / "console.txt").write_text(proc.stdout + proc.stderr)
    summaries = sorted((out / "runs").glob("*/summary.json"))
    if proc.returncode or not summaries:
        return {"seed": seed, "load": load, "error": (proc.stdout + proc.stderr)[-400:]}
    s = json.loads(summaries[-1].read_text())
    times = s.get("stage_times") or {}
    m = s.get("metrics") or {}
    return {"seed": seed, "load": load, "wall": s["seconds"], "gate": bool((s.get("gate") or {}).get("passed")),
            "compute": sum(t.get("compute", 0.0) for t in times.values()),
            "overhead": sum(t.get("overhead", 0.0) for t in times.values()),
            "stages": {k: times.get(k, {}).get("wall") for k in STAGES},
            "gold": m.get("policy_gold_mean"), "sft_gold": m.get("baseline_gold_mean")}


def table(rows: list[dict]) -> str:
    head = "| revision | seed | load | wall s | compute s | overhead s | " + " | ".join(STAGES) + \
        " | gold vs SFT | gate |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['rev']} | {r['seed']} | {r['load']:.2f} | failed: {r['error'][-120:]!r} |")
            continue
        st = " | ".join(f"{r['stages'][k]:.0f}" if r["stages"].get(k) is not None else "-" for k in STAGES)
        gain = f"{r['gold']:.2f} vs {r['sft_gold']:.2f} ({r['gold'] - r['sft_gold']:+.2f})" \
            if r.get("gold") is not None else "-"
        lines.append(f"| {r['rev']} | {r['seed']} | {r['load']:.2f} | {r['wall']:.0f} | {r['compute']:.0f} | "
                     f"{r['overhead']:.0f} | {st} | {gain} | {'passed' if r['gate'] else 'FAILED'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--peer", help="another revision to measure beside this checkout (e.g. a commit or main~3)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rlhf-demo-time"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_time.json")
    args = ap.parse_args()
    if not (ROOT / "data" / "raw").is_dir():
        sys.exit("data/raw is missing: run `make data` first")
    trees = {"ours": ROOT}
    if args.peer:
        trees[args.peer] = checkout(args.peer, args.work)
    rows = []
    gflops = {"start": matmul_gflops()}
    print(f"fp32 matmul (1024 x 1024, torch): {gflops['start']:.0f} GFLOP/s at the start", flush=True)
    for seed in args.seeds:
        for rev, tree in trees.items():
            r = {"rev": rev, **one_run(tree, seed, args.work / f"{rev.replace('/', '_')}-seed{seed}")}
            rows.append(r)
            print(table([r]).splitlines()[-1], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"matmul_gflops": gflops, "runs": rows}, indent=1) + "\n")
    gflops["end"] = matmul_gflops()
    args.out.write_text(json.dumps({"matmul_gflops": gflops, "runs": rows}, indent=1) + "\n")
    print("\n" + table(rows))
    print(f"fp32 matmul: {gflops['start']:.0f} GFLOP/s at the start, {gflops['end']:.0f} at the end "
          "(the machine's speed varies from day to day: compare runs made side by side)")
    walls = {rev: [r["wall"] for r in rows if r["rev"] == rev and "wall" in r] for rev in trees}
    for rev, w in walls.items():
        if w:
            print(f"{rev}: mean wall {mean(w):.0f} s over {len(w)} run(s), max {max(w):.0f} s")
    if args.peer and walls["ours"] and walls[args.peer]:
        print(f"peer / ours wall time: {mean(walls[args.peer]) / mean(walls['ours']):.2f}x")


if __name__ == "__main__":
    main()
