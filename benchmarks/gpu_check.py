"""The GPU check: the SmolLM2-135M + LoRA stages on one GPU, a 2-process torchrun PPO step when there are
two GPUs, and the figures that only a GPU can give. Run it through ``benchmarks/gpu_check.sh``.

What it runs, each stage as its own ``rlhf`` process on the demo data, with a time budget each:

1. prepare (demo data), sft, reward, ppo: SmolLM2-135M-Instruct with LoRA (the base params.yaml
   model section), bf16 autocast on fp32 master weights; few steps (the point is speed and that it
   runs, not quality);
2. with >= 2 GPUs: the same PPO as ``torchrun --standalone --nproc-per-node 2`` (NCCL);
3. ``benchmarks/ppo_vs_trl.py --size smollm2`` (ours vs TRL 1.12 PPO, one seed, few steps) when TRL's
   virtualenv exists or can be made; otherwise recorded as skipped with the reason.

Figures: tokens/s (SFT, reward, PPO), episodes/s (PPO), peak GPU memory per stage (``nvidia-smi``
memory.used, polled; includes the CUDA context), an MFU estimate (``k x params x tokens/s / peak
bf16 FLOP/s`` with k = 6 for full fine-tuning and 4 with LoRA: the frozen weights get no weight
gradients; the peak is looked up by GPU name and the estimate is null for an unknown GPU), and the
ours/TRL-PPO episodes/s ratio. Everything goes into one JSON file, rewritten after every stage, so a
run cut by the time limit still leaves what it measured.

``--dry-run`` (or no GPU): the same plan with the tiny model on the CPU, a step or two each, to check
the wiring; its figures say ``"device": "cpu"`` and are not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: dense bf16 tensor-core peak FLOP/s by GPU name fragment (vendor data sheets, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
             "A10": 125e12, "V100": 125e12, "T4": 65e12, "RTX 4090": 165e12, "A6000": 155e12}

TOK_S = re.compile(r"tok/s=([\d,]+)")
EP_S = re.compile(r"ep/s=([\d.]+)")


def gpu_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"count": 0, "reason": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"count": 0, "reason": "torch.cuda.is_available() is False"}
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"count": len(names), "names": names, "bf16": bool(torch.cuda.is_bf16_supported()),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


class MemoryPoll:
    """Peak ``nvidia-smi`` memory.used (MiB, summed over GPUs) while a stage runs."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak, self._stop = every_s, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = sum(float(x) for x in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(self.every_s)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def rates(log: str) -> dict:
    """The last progress line's tok/s (and ep/s for PPO)."""
    out = {}
    toks = TOK_S.findall(log)
    if toks:
        out["tokens_per_s"] = float(toks[-1].replace(",", ""))
    eps = EP_S.findall(log)
    if eps:
        out["episodes_per_s"] = float(eps[-1])
    return out


def count_params(model_dir: Path) -> int:
    """Parameters of a saved model, from its safetensors headers."""
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                size = 1
                for dim in st.get_slice(k).get_shape():
                    size *= dim
                n += size
    return n


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


class Check:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.results_path = Path(args.out)
        self.gpu = gpu_info()
        self.dry = args.dry_run or self.gpu["count"] == 0
        self.deadline = time.monotonic() + args.budget_s
        self.report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": self.gpu,
                             "mode": "dry-run on CPU (not GPU figures)" if self.dry else "gpu", "stages": {}}
        if self.gpu["count"] == 0:
            self.report["note"] = f"no GPU: {self.gpu['reason']}; ran the dry run instead"

    def save(self) -> None:
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2) + "\n")
        os.replace(tmp, self.results_path)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def params_file(self) -> Path:
        if self.dry:
            model = {"name": "tiny", "device": "cpu", "cache_dir": str(self.work / "model-cache")}
            sft = {"max_steps": 2, "batch_size": 4, "eval_max_rows": 8}
            reward = {"max_steps": 2, "batch_size": 4, "eval_max_rows": 8, "gold_pairs": 16}
            ppo = {"total_steps": 2, "rollout_batch_size": 4, "max_new_tokens": 8, "checkpoint_every": 0}
        else:  # SmolLM2 + LoRA as in params.yaml's base sections; few steps
            model = {"name": "smollm2-135m", "lora": True, "lora_r": 16, "lora_alpha": 32, "device": "cuda",
                     "dtype": "auto"}
            sft = {"max_steps": 60, "batch_size": 16, "max_seq_len": 256, "eval_max_rows": 64, "log_every": 10}
            reward = {"max_steps": 60, "batch_size": 16, "max_seq_len": 256, "eval_max_rows": 64,
                      "gold_pairs": 64, "log_every": 10}
            ppo = {"total_steps": 10, "rollout_batch_size": 64, "max_new_tokens": 48, "ppo_epochs": 2,
                   "num_minibatches": 2, "checkpoint_every": 0, "log_every": 1, "lr": 5e-5}
        import yaml

        p = self.work / "params.yaml"
        p.write_text(yaml.safe_dump({"model": model, "sft": sft, "reward": reward, "ppo": ppo}))
        return p

    def run(self, name: str, cmd: list[str], budget_s: float, env_extra: dict | None = None) -> dict:
        # per-stage budgets on a GPU; the dry run (CPU, often a shared machine) just uses what is left
        limit = max(10.0, self.left() - 5 if self.dry else min(budget_s, self.left() - 5))
        env = {**os.environ, "RLHF_TRACKING": "off", "RLHF_PROFILE": "", "PYTHONUNBUFFERED": "1",
               **(env_extra or {})}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        print(f"[gpu-check] {name}: {' '.join(cmd)} (limit {limit:.0f}s)", flush=True)
        t0 = time.monotonic()
        with MemoryPoll() as mem:
            try:
                r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=limit)
                rc, log = r.returncode, r.stdout + r.stderr
            except subprocess.TimeoutExpired as e:
                rc, log = "timeout", _text(e.stdout) + _text(e.stderr)
        res = {"rc": rc, "seconds": round(time.monotonic() - t0, 1), **rates(log),
               "peak_gpu_memory_mib": mem.peak}
        if rc != 0:
            res["log_tail"] = log[-3000:]
        (self.work / f"{name}.log").write_text(log)
        self.report["stages"][name] = res
        self.save()
        print(f"[gpu-check] {name}: {json.dumps({k: v for k, v in res.items() if k != 'log_tail'})}", flush=True)
        return res

    def mfu(self, res: dict, params: int, lora: bool) -> float | None:
        name = (self.gpu.get("names") or [""])[0]
        peak = peak_flops(name)
        if self.dry or not peak or "tokens_per_s" not in res:
            return None
        k = 4 if lora else 6
        return k * params * res["tokens_per_s"] / (peak * max(1, res.get("processes", 1)))

    def main(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        params = self.params_file()
        cli = [sys.executable, "-m", "rlhf.cli"]
        raw, ds = self.work / "raw", self.work / "dataset"
        from rlhf.data import demo

        if not raw.exists():
            demo.generate(raw)
        a = self.work / "artifacts"
        shutil.rmtree(a, ignore_errors=True)
        self.run("prepare", [*cli, "prepare", "--raw", str(raw), "--out", str(ds), "--params", str(params)], 120)
        sft = self.run("sft", [*cli, "sft", "--dataset", str(ds), "--out", str(a / "sft"), "--params", str(params)],
                       150)
        rm = self.run("reward", [*cli, "reward", "--dataset", str(ds), "--sft", str(a / "sft"), "--out",
                                 str(a / "reward"), "--params", str(params)], 120)
        ppo_args = ["ppo", "--dataset", str(ds), "--sft", str(a / "sft"), "--reward", str(a / "reward"),
                    "--params", str(params)]
        ppo = self.run("ppo", [*cli, *ppo_args, "--out", str(a / "ppo")], 150)
        if self.gpu["count"] >= 2 and not self.dry:
            ddp = self.run("ppo_torchrun_2", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc-per-node", "2", "-m", "rlhf.cli", *ppo_args,
                                              "--out", str(a / "ppo-2")], 120)
            ddp["processes"] = 2
        else:
            self.report["stages"]["ppo_torchrun_2"] = {"skipped": f"needs 2 GPUs, found {self.gpu['count']}"}
        lora = not self.dry
        if (a / "sft").exists():
            n = count_params(a / "sft")
            self.report["model_params"] = n
            for res in (sft, rm, ppo, self.report["stages"].get("ppo_torchrun_2", {})):
                if "tokens_per_s" in res:
                    res["mfu_estimate"] = self.mfu(res, n, lora)
        self.trl_ratio(a)
        self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
        print(f"[gpu-check] results in {self.results_path}", flush=True)
        ok = all(r.get("rc", 0) == 0 for r in self.report["stages"].values())
        return 0 if ok else 1

    def trl_ratio(self, a: Path) -> None:
        """ours vs TRL-PPO episodes/s through benchmarks/ppo_vs_trl.py (it needs TRL 1.12's virtualenv)."""
        venv = Path(self.args.trl_venv)
        if self.dry:
            self.report["ppo_vs_trl"] = {"skipped": "dry run"}
        elif not (venv / "bin" / "python").exists() and not self.args.make_trl_venv:
            self.report["ppo_vs_trl"] = {"skipped": f"no TRL 1.12 virtualenv at {venv} (pass --make-trl-venv "
                                                    "where PyPI is reachable)"}
        elif self.left() < 120:
            self.report["ppo_vs_trl"] = {"skipped": f"time budget spent ({self.left():.0f}s left)"}
        else:
            out = self.work / "ppo_vs_trl.json"
            res = self.run("ppo_vs_trl", [sys.executable, str(ROOT / "benchmarks" / "ppo_vs_trl.py"), "--size",
                                          "smollm2", "--sft", str(a / "sft"), "--reward", str(a / "reward"),
                                          "--dataset", str(self.work / "dataset"), "--seeds", "0", "--steps", "5",
                                          "--only", "ours", "trl_ppo", "--trl-venv", str(venv),
                                          "--out", str(out)], self.left() - 10)
            summary = {"rc": res["rc"]}
            if out.exists():
                report = json.loads(out.read_text())
                summary["report"] = report
            self.report["ppo_vs_trl"] = summary
        self.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the wiring only")
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "rlhf-gpu-check"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting new work after this long")
    ap.add_argument("--trl-venv", default=str(Path.home() / ".cache" / "rlhf" / "venv-trl-1.12.0"))
    ap.add_argument("--make-trl-venv", action="store_true", help="let ppo_vs_trl.py create TRL's virtualenv")
    args = ap.parse_args(argv)
    check = Check(args)
    if check.gpu["count"] == 0 and not args.dry_run:
        print(f"[gpu-check] no GPU ({check.gpu['reason']}): running the CPU dry run; these are NOT GPU figures",
              flush=True)
    return check.main()


if __name__ == "__main__":
    sys.exit(main())
