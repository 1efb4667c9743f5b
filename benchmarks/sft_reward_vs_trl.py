"""Our SFT and reward stages vs TRL's SFTTrainer / RewardTrainer, configured identically.

Same tiny model and tokenizer, same demo data, batch size, sequence length,
learning rate, schedule and number of steps; each run in its own process (so
threads and caches start equal), one after the other in this one script run.
Reports training throughput (samples/s, model loading and evaluation
excluded) and final held-out loss / pairwise accuracy, and the ratio ours/TRL.

    .venv/bin/python benchmarks/sft_reward_vs_trl.py [--steps 60] [--batch 16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RLHF_TRACKING", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def setup(work: Path, steps: int, batch: int):
    """Demo data -> prepared dataset -> tiny base model + an SFT model for the reward runs (cached in work)."""
    from rlhf.config import ModelConfig, SFTConfig
    from rlhf.data import demo
    from rlhf.data.prepare import dataset_texts, prepare
    from rlhf.train import models
    from rlhf.train.sft import train_sft

    ds = work / "dataset"
    if not ds.exists():
        demo.generate(work / "raw")
        prepare(work / "raw", ds)
    mcfg = ModelConfig(name="tiny", cache_dir=str(work / "cache"))
    base = models.resolve_base(mcfg, dataset_texts(ds))
    sft = work / "sft-init"
    if not sft.exists():
        train_sft(ds, sft, SFTConfig(max_steps=100, batch_size=16, lr=3e-3), mcfg)
    return ds, mcfg, base, sft


def run_ours(kind: str, work: Path, steps: int, batch: int, lr: float, max_len: int) -> dict:
    from rlhf.config import RewardConfig, SFTConfig
    from rlhf.train.reward import train_reward
    from rlhf.train.sft import train_sft

    ds, mcfg, base, sft = setup(work, steps, batch)
    common = dict(max_steps=steps, batch_size=batch, lr=lr, max_seq_len=max_len, warmup_ratio=0.0, log_every=1000)
    if kind == "sft":
        m = train_sft(ds, work / "ours-sft", SFTConfig(**common, eval_max_rows=128), mcfg)
        return {"samples_per_s": m["samples_per_s"], "final": m["eval_loss"], "metric": "eval_loss",
                "train_seconds": m["seconds"]}
    m = train_reward(ds, sft, work / "ours-rm", RewardConfig(**common, eval_max_rows=256, gold_pairs=0), mcfg)
    return {"samples_per_s": m["samples_per_s"], "final": m["eval_accuracy"], "metric": "eval_accuracy",
            "train_seconds": m["seconds"]}


def run_trl(kind: str, work: Path, steps: int, batch: int, lr: float, max_len: int) -> dict:
    import pandas as pd
    from datasets import Dataset

    from rlhf.train import models

    ds, mcfg, base, sft = setup(work, steps, batch)
    common = dict(output_dir=str(work / f"trl-{kind}"), max_steps=steps, per_device_train_batch_size=batch,
                  learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, logging_steps=1000,
                  save_strategy="no", report_to="none", use_cpu=True, seed=0, max_length=max_len,
                  dataloader_num_workers=0, disable_tqdm=True)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        model, tok = models.load_policy(base, mcfg, for_training=True)
        tok.padding_side = "right"

        def conv(df):
            return Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                       "completion": [{"role": "assistant", "content": r}]}
                                      for p, r in zip(df["prompt"], df["response"])])

        train = conv(pd.read_parquet(ds / "sft" / "train.parquet"))
        ev = conv(pd.read_parquet(ds / "sft" / "eval.parquet").head(128))
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, completion_only_loss=True,
                                                         per_device_eval_batch_size=batch),
                             train_dataset=train, eval_dataset=ev, processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
        final = trainer.evaluate()["eval_loss"]
        return {"samples_per_s": steps * batch / secs, "final": final, "metric": "eval_loss", "train_seconds": secs}

    from trl import RewardConfig, RewardTrainer

    model, tok = models.load_reward_model(sft, mcfg, for_training=True, init_from_causal=True)
    tok.padding_side = "right"

    def conv(df):
        return Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                   "chosen": [{"role": "assistant", "content": c}],
                                   "rejected": [{"role": "assistant", "content": r}]}
                                  for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"])])

    train = conv(pd.read_parquet(ds / "preferences" / "train.parquet"))
    ev_df = pd.read_parquet(ds / "preferences" / "eval.parquet").head(256)
    trainer = RewardTrainer(model=model, args=RewardConfig(**common, per_device_eval_batch_size=batch),
                            train_dataset=train, eval_dataset=conv(ev_df), processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    # TRL's own held-out accuracy, on TRL's tokenisation (its chat template puts a newline after EOS)
    acc = trainer.evaluate()["eval_accuracy"]
    return {"samples_per_s": steps * batch / secs, "final": acc, "metric": "eval_accuracy", "train_seconds": secs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-bench")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sft_reward_vs_trl.json"))
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "KIND"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    lrs = {"sft": 3e-3, "reward": 1e-3}
    if a.one:
        impl, kind = a.one
        fn = run_ours if impl == "ours" else run_trl
        print("RESULT " + json.dumps(fn(kind, a.work, a.steps, a.batch, lrs[kind], a.max_len)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    setup(a.work, a.steps, a.batch)  # build shared inputs once, outside the timed runs
    results = {}
    for kind in ("sft", "reward"):
        for impl in ("ours", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--one", impl, kind, "--steps", str(a.steps),
                                   "--batch", str(a.batch), "--max-len", str(a.max_len), "--work", str(a.work)],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{impl} {kind} failed")
            results[f"{impl}_{kind}"] = json.loads(line[0][7:])
            print(impl, kind, results[f"{impl}_{kind}"], flush=True)
    rows = []
    for kind in ("sft", "reward"):
        o, t = results[f"ours_{kind}"], results[f"trl_{kind}"]
        rows.append({"stage": kind, "ours_samples_per_s": o["samples_per_s"], "trl_samples_per_s": t["samples_per_s"],
                     "throughput_ratio": o["samples_per_s"] / t["samples_per_s"], "metric": o["metric"],
                     "ours_final": o["final"], "trl_final": t["final"]})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": vars(a) | {"work": str(a.work), "out": str(a.out)}, "rows": rows},
                                indent=2, default=str))
    print("| stage | ours samples/s | TRL samples/s | ratio ours/TRL | metric | ours | TRL |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['ours_samples_per_s']:.1f} | {r['trl_samples_per_s']:.1f} | "
              f"{r['throughput_ratio']:.2f}x | {r['metric']} | {r['ours_final']:.3f} | {r['trl_final']:.3f} |")


if __name__ == "__main__":
    main()
