"""Our PPO trainer, in each of its configurations, vs TRL's last PPO trainer and TRL's RLOO and GRPO.

Trainers: ours (``critic: separate``, the default), ours_shared (``critic: shared``), ours_onebase
(``critic: adapter`` + ``reward: adapter``: one base model; LoRA only), ours_rloo / ours_grpo
(``estimator: rloo|grpo``, k = 2); trl_ppo (``trl==1.12.0``, ``trl.experimental.ppo``, the last
release with PPO, in a virtualenv the script creates: ``torch==2.13.0`` first), trl_rloo / trl_grpo
(TRL 1.16's ``RLOOTrainer`` / ``GRPOTrainer``, this project's virtualenv, ``pip install -e ".[bench]"``).

Identical settings: the same SFT policy (model + tokenizer), reward model (read at EOS, EOS appended)
and training prompts; ``--episodes`` responses per step (the critic-free ones: episodes / 2 prompts x
2 samples), ``--response-length`` new tokens, temperature 0.7, 4 PPO epochs of ``--minibatches``
optimizer steps each, beta 0.05 (k1 in the reward; TRL's GRPO puts its KL in the loss), clip 0.2,
value clip 0.2, vf coef 0.1, gamma 1, lambda 0.95, missing-EOS penalty 1 (PPOs), constant learning
rate, Adam eps 1e-5, raw (unnormalised) reward-model scores, LoRA r 16 / alpha 32 on all linear
layers at the smollm2 size. Everything else is each trainer's own default (TRL GRPO's loss type and
reward scaling included).

Each trainer runs in its own process, one after the other, seeds in the outer loop (same threads,
caches start cold). Reported per trainer: episodes/s over the training loop (model loading and the
final save excluded), the process's peak RSS (VmHWM) and that minus a process that only imports torch +
transformers, and -- evaluated identically afterwards by this script -- mean gold score, reward-model
score and KL(policy || SFT) on held-out prompts (same sampling seeds, the training response budget).
The machine's matmul limit is measured in the same run (a 1024 x 1024 fp32 torch matmul, at the start
and the end), and each trainer's useful GFLOP/s (``useful_flops_per_episode`` x episodes/s, the same
count for every trainer) is reported as a fraction of it.

    .venv/bin/python benchmarks/ppo_vs_trl.py [--size tiny|smollm2] [--steps 20] [--sft DIR --reward DIR]

The tiny size builds (and caches in --work) the tiny SFT policy and reward model with the tiny
profile's recipe unless --sft/--reward are given; smollm2 uses SmolLM2-135M-Instruct with LoRA
(r 16) for every trainer and needs --sft/--reward (made with the base params.yaml sections, the
reward model with ``reward.save_adapter: true`` for ours_onebase).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import matmul_gflops  # benchmarks/machine.py (this script's folder is on sys.path)

os.environ.setdefault("RLHF_TRACKING", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROOT = Path(__file__).resolve().parents[1]
TRL_PPO_VERSION = "1.12.0"
TORCH_VERSION = "2.13.0"

# the settings every trainer gets
S = {"episodes_per_step": 32, "response_length": 16, "temperature": 0.7, "ppo_epochs": 4, "minibatches": 1,
     "kl_coef": 0.05, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95,
     "missing_eos_penalty": 1.0, "adam_eps": 1e-5, "max_grad_norm": 1.0}


# ----------------------------------------------------------------------------- workers (one process each)


# our trainer's configurations (PPOConfig fields on top of the common settings); k = 2 for the critic-free ones
OURS = {
    "ours": {},  # critic: separate (the InstructGPT recipe: the critic is a second model, from the reward model)
    "ours_shared": {"critic": "shared"},  # a value head on the policy's last hidden state: one forward/backward
    "ours_onebase": {"critic": "adapter", "reward": "adapter"},  # LoRA only: policy, critic, RM, ref on one base
    "ours_rloo": {"estimator": "rloo", "num_samples_per_prompt": 2},
    "ours_grpo": {"estimator": "grpo", "num_samples_per_prompt": 2},
}


def worker_ours(cfg: dict) -> dict:
    from rlhf.config import ModelConfig, PPOConfig
    from rlhf.ppo import train_ppo

    variant = OURS[cfg["trainer"]]
    k = variant.get("num_samples_per_prompt", 1)
    mc = ModelConfig(name="tiny", device="cpu", lora=cfg["lora"], lora_r=16, lora_alpha=32)
    pc = PPOConfig(total_steps=cfg["steps"], rollout_batch_size=S["episodes_per_step"] // k, **variant,
                   micro_batch_size=cfg.get("micro_batch"), ppo_epochs=S["ppo_epochs"],
                   num_minibatches=S["minibatches"], max_new_tokens=S["response_length"],
                   temperature=S["temperature"], lr=cfg["lr"], lr_schedule="constant", adam_eps=S["adam_eps"],
                   max_grad_norm=S["max_grad_norm"], clip_eps=S["cliprange"], vf_clip_eps=S["cliprange_value"],
                   vf_coef=S["vf_coef"], gamma=S["gamma"], lam=S["lam"], kl_coef=S["kl_coef"], kl_estimator="k1",
                   normalize_reward=False, missing_eos_penalty=S["missing_eos_penalty"], checkpoint_every=0,
                   max_prompt_len=128, seed=cfg["seed"], log_every=5)
    m = train_ppo(cfg["dataset"], cfg["sft"], cfg["reward"], cfg["out"], pc, mc)
    return {"train_seconds": m["seconds"], "episodes": m["episodes"]}


def _trl_reward_fn(cfg: dict, tok):
    """TRL's reward function for RLOO/GRPO: our reward model read at EOS (EOS appended), as in our PPO."""
    from rlhf.config import ModelConfig
    from rlhf.train import models
    from rlhf.train.reward import score_texts

    raw_of = dict(zip(_chat_prompts(tok, cfg["prompts"]), cfg["prompts"]))
    rm, rm_tok = models.load_reward_model(cfg["reward"], ModelConfig(name="tiny", device="cpu"), for_training=False)

    def reward(prompts, completions, **kw):
        return score_texts(rm, rm_tok, [raw_of[p] for p in prompts], [c.strip() for c in completions],
                           256).tolist()

    return reward


def _lora_config(cfg: dict):
    """The LoRA of every TRL trainer at the smollm2 size (r 16, alpha 32, all linear layers), as ours; None: full."""
    if not cfg["lora"]:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def _chat_prompts(tok, prompts: list[str]) -> list[str]:
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def worker_trl_ppo(cfg: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["sft"], padding_side="left")
    assert tok.pad_token_id != tok.eos_token_id
    ids = [tok(t, add_special_tokens=False).input_ids[-128:] for t in _chat_prompts(tok, cfg["prompts"])]
    train = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(cfg["sft"], dtype=torch.float32)
    ref = None if cfg["lora"] else AutoModelForCausalLM.from_pretrained(cfg["sft"], dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1, dtype=torch.float32)
    peft_config = _lora_config(cfg)
    args = PPOConfig(
        output_dir=cfg["out"] + ".trl", per_device_train_batch_size=S["episodes_per_step"],
        gradient_accumulation_steps=1, num_mini_batches=S["minibatches"], num_ppo_epochs=S["ppo_epochs"],
        total_episodes=cfg["steps"] * S["episodes_per_step"], response_length=S["response_length"],
        temperature=S["temperature"], learning_rate=cfg["lr"], lr_scheduler_type="constant",
        adam_epsilon=S["adam_eps"], max_grad_norm=S["max_grad_norm"], kl_coef=S["kl_coef"], kl_estimator="k1",
        cliprange=S["cliprange"], cliprange_value=S["cliprange_value"], vf_coef=S["vf_coef"], gamma=S["gamma"],
        lam=S["lam"], missing_eos_penalty=S["missing_eos_penalty"], stop_token="eos",
        local_rollout_forward_batch_size=S["episodes_per_step"], num_sample_generations=0, report_to=[],
        logging_steps=5, save_strategy="no", seed=cfg["seed"], use_cpu=True, bf16=False, fp16=False,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=train, value_model=value, peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    if cfg["lora"]:
        trained = trained.merge_and_unload()
    trained.save_pretrained(cfg["out"])
    tok.save_pretrained(cfg["out"])
    return {"train_seconds": seconds, "episodes": cfg["steps"] * S["episodes_per_step"]}


def worker_trl_group(cfg: dict) -> dict:
    """TRL 1.16's RLOOTrainer or GRPOTrainer (``cfg["trainer"]`` trl_rloo / trl_grpo): k = 2 samples per prompt."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    grpo = cfg["trainer"] == "trl_grpo"
    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["sft"], padding_side="left")
    rendered = _chat_prompts(tok, cfg["prompts"])
    reward = _trl_reward_fn(cfg, tok)
    policy = AutoModelForCausalLM.from_pretrained(cfg["sft"], dtype=torch.float32)
    peft_config = _lora_config(cfg)
    rounds = cfg["steps"]
    Config, Trainer = (GRPOConfig, GRPOTrainer) if grpo else (RLOOConfig, RLOOTrainer)
    mb = S["minibatches"]  # one generation batch of episodes_per_step, mb optimizer steps per pass over it
    args = Config(
        output_dir=cfg["out"] + ".trl", per_device_train_batch_size=S["episodes_per_step"] // mb,
        steps_per_generation=mb, num_generations=2,
        max_completion_length=S["response_length"], temperature=S["temperature"], top_k=0, top_p=1.0,
        beta=S["kl_coef"], num_iterations=S["ppo_epochs"], epsilon=S["cliprange"], learning_rate=cfg["lr"],
        lr_scheduler_type="constant", adam_epsilon=S["adam_eps"], max_grad_norm=S["max_grad_norm"],
        max_steps=rounds * S["ppo_epochs"] * mb, logging_steps=5, report_to=[], save_strategy="no",
        seed=cfg["seed"], use_cpu=True, bf16=False, disable_dropout=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=policy, reward_funcs=[reward], args=args,
                      train_dataset=Dataset.from_dict({"prompt": rendered}), processing_class=tok,
                      peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if cfg["lora"]:
        trained = trained.merge_and_unload()
    trained.save_pretrained(cfg["out"])
    tok.save_pretrained(cfg["out"])
    return {"train_seconds": seconds, "episodes": rounds * S["episodes_per_step"]}


WORKERS = {**{n: worker_ours for n in OURS}, "trl_ppo": worker_trl_ppo, "trl_rloo": worker_trl_group,
           "trl_grpo": worker_trl_group}
PEERS = ("trl_ppo", "trl_rloo", "trl_grpo")


# ----------------------------------------------------------------------------- the driver


def trl_venv(path: Path) -> Path:
    """A virtualenv with torch==2.13.0 and trl==1.12.0 (created once)."""
    py = path / "bin" / "python"
    marker = path / ".ready"
    if marker.exists():
        return py
    print(f"creating {path} with torch=={TORCH_VERSION} and trl=={TRL_PPO_VERSION} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"trl=={TRL_PPO_VERSION}", "peft"], check=True)
    marker.write_text("ok\n")
    return py


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM) in MB.

    Not ``getrusage().ru_maxrss``: on Linux a process started by fork + exec inherits its parent's
    high-water mark in ``ru_maxrss``, so a worker started by this (large) driver would report the
    driver's memory. VmHWM belongs to the process's own address space.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def run_worker(python: str, name: str, cfg: dict, log_path: Path) -> dict:
    """Run one trainer in a fresh process; its result, with the process's own peak RSS."""
    cfg_path = log_path.with_suffix(".json")
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") if name != "trl_ppo" else ""}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", name, "--config", str(cfg_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        code = proc.wait()
    if code != 0:
        return {"error": f"exit {code}", "log_tail": log_path.read_text()[-3000:]}
    result = json.loads(Path(cfg["result"]).read_text())
    result["episodes_per_s"] = result["episodes"] / result["train_seconds"]
    return result


def import_baseline_rss(python: str) -> float:
    """Peak RSS (MB) of a process that only imports torch + transformers with ``python``: the floor under each row."""
    code = ("import torch, transformers; from transformers import AutoModelForCausalLM; "
            "print([int(x.split()[1]) / 1024 for x in open('/proc/self/status') if x.startswith('VmHWM:')][0])")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def evaluate_policy(path: str | Path, sft: str | Path, reward: str | Path, prompts: list[str], seed: int = 1234):
    """Gold, RM score and KL(policy || SFT) on ``prompts``: the training budget and temperature, fixed seeds."""
    import torch

    from rlhf.config import ModelConfig
    from rlhf.data import demo
    from rlhf.train import generation, models
    from rlhf.train.reward import score_texts

    mc = ModelConfig(name="tiny", device="cpu")
    pol, tok = models.load_policy(path, mc, for_training=False)
    base, _ = models.load_policy(sft, mc, for_training=False)
    rm, rm_tok = models.load_reward_model(reward, mc, for_training=False)
    gold, rms, kls, eos = [], [], [], []
    for i in range(0, len(prompts), 32):
        batch = prompts[i : i + 32]
        ro = generation.sample(pol, tok, batch, max_new_tokens=S["response_length"], temperature=S["temperature"],
                               generator_seed=seed + i)
        gold += [demo.gold_score(p, t) for p, t in zip(batch, ro.texts)]
        rms += score_texts(rm, rm_tok, batch, ro.texts, 256).tolist()
        with torch.no_grad():
            lp = generation.response_logprobs(pol, ro, S["temperature"])
            lb = generation.response_logprobs(base, ro, S["temperature"])
        kls += ((lp - lb) * ro.response_mask).sum(1).tolist()
        eos += ro.has_eos.float().tolist()
    n = len(prompts)
    return {"gold": sum(gold) / n, "rm_score": sum(rms) / n, "kl": sum(kls) / n, "eos_rate": sum(eos) / n}


def prepare_inputs(args) -> tuple[Path, Path, Path]:
    from rlhf.config import ModelConfig, RewardConfig, SFTConfig
    from rlhf.data import demo
    from rlhf.data.prepare import prepare
    from rlhf.train.reward import train_reward
    from rlhf.train.sft import train_sft

    work = Path(args.work)
    ds = Path(args.dataset) if args.dataset else work / "dataset"
    if not ds.exists():
        demo.generate(work / "raw")
        prepare(work / "raw", ds)
    if args.sft and args.reward:
        return ds, Path(args.sft), Path(args.reward)
    if args.size != "tiny":
        raise SystemExit("--size smollm2 needs --sft and --reward (run `rlhf sft` / `rlhf reward` with the base params)")
    mc = ModelConfig(name="tiny", cache_dir=str(work / "cache"), device="cpu")
    sft, rm = work / "sft", work / "reward"
    if not sft.exists():  # the tiny profile's recipe (params.yaml profiles.tiny)
        train_sft(ds, sft, SFTConfig(max_steps=300, batch_size=16, lr=3e-3, max_seq_len=128, eval_max_rows=64), mc)
    if not rm.exists():
        train_reward(ds, sft, rm, RewardConfig(max_steps=200, batch_size=16, lr=1e-3, max_seq_len=128,
                                               eval_max_rows=128, gold_pairs=200), mc)
    return ds, sft, rm


def useful_flops_per_episode(sft: Path, prompts: list[str], lora: bool) -> dict:
    """The work one episode needs, counted the same for every trainer (an estimate, in FLOPs).

    P = the weights every token goes through (all linear layers, the LM head included; attention's
    score/value products are small at these lengths and left out), T = mean prompt tokens + the
    response budget. Rollout: generation 2 P T; scoring: the rollout policy's, the reference's and the
    reward model's forwards 3 x 2 P T; update: ppo_epochs x a forward and backward of the policy, 4 P T with
    LoRA (the backward computes activation gradients only) or 6 P T fully fine-tuned. A critic's work is
    not counted as useful: it is what the shared head and the critic-free estimators remove.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(sft)
    p = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    prompt_tokens = sum(min(len(tok(t, add_special_tokens=False).input_ids), 128)
                        for t in _chat_prompts(tok, prompts[:256])) / min(len(prompts), 256)
    t = prompt_tokens + S["response_length"]
    update = S["ppo_epochs"] * (4 if lora else 6) * p * t
    return {"params_in_matmuls": p, "mean_prompt_tokens": prompt_tokens,
            "flops": 2 * p * t + 3 * 2 * p * t + update}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--config")
    ap.add_argument("--size", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=20, help="PPO steps (x --episodes) per trainer")
    ap.add_argument("--episodes", type=int, default=S["episodes_per_step"], help="episodes (responses) per step")
    ap.add_argument("--minibatches", type=int, default=S["minibatches"], help="optimizer steps per PPO epoch")
    ap.add_argument("--response-length", type=int, default=S["response_length"], help="response budget, tokens")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="ours: rows per forward/backward (the same update at a lower peak memory)")
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-4 tiny, 5e-5 smollm2 (LoRA)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "rlhf" / "bench-ppo"))
    ap.add_argument("--dataset")
    ap.add_argument("--sft")
    ap.add_argument("--reward")
    ap.add_argument("--trl-venv", default=str(Path.home() / ".cache" / "rlhf" / f"venv-trl-{TRL_PPO_VERSION}"))
    ap.add_argument("--only", nargs="*", choices=sorted(WORKERS), help="run only these trainers")
    ap.add_argument("--first-seed-only", nargs="*", default=[], choices=sorted(WORKERS),
                    help="trainers that run with the first seed only (to fit a time budget)")
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per trainer and seed")
    ap.add_argument("--report", help="print the table of this results file (of a finished or stopped run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ppo_vs_trl.json"))
    args = ap.parse_args()

    if args.report:  # print the table of an earlier (or a partial) run
        print_report(json.loads(Path(args.report).read_text()))
        return
    if args.worker:  # inside a worker process
        cfg = json.loads(Path(args.config).read_text())
        S.update(cfg["settings"])
        result = WORKERS[args.worker](cfg)
        result["peak_rss_mb"] = peak_rss_mb()
        Path(cfg["result"]).write_text(json.dumps(result))
        return

    from rlhf.data.prepare import load_split

    S.update(episodes_per_step=args.episodes, response_length=args.response_length, minibatches=args.minibatches)
    ds, sft, rm = prepare_inputs(args)
    work = Path(args.work) / f"run-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    lora = args.size == "smollm2"
    lr = args.lr or (5e-5 if lora else 3e-4)
    train_prompts = load_split(ds, "prompts", "train")["prompt"].tolist()
    eval_prompts = load_split(ds, "prompts", "eval")["prompt"].tolist()[: args.eval_prompts]
    names = args.only or [*OURS, *PEERS]
    if not lora:
        names = [n for n in names if n != "ours_onebase"]  # adapters need LoRA
    pythons = {n: sys.executable for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, dict] = {}
    if "trl_ppo" in names:
        try:
            pythons["trl_ppo"] = str(trl_venv(Path(args.trl_venv)))
        except (subprocess.CalledProcessError, OSError) as e:
            errors["trl_ppo"] = {"error": f"could not create the trl=={TRL_PPO_VERSION} virtualenv: {e}"}
    baselines = {n: import_baseline_rss(pythons[n]) for n in names if n not in errors}
    gflops_start = matmul_gflops()
    work_per_episode = useful_flops_per_episode(sft, train_prompts, lora)
    print(f"[bench] matmul limit {gflops_start:.1f} GFLOP/s; useful work {work_per_episode['flops'] / 1e9:.1f} "
          f"GFLOP per episode", flush=True)
    sft_eval = evaluate_policy(sft, sft, rm, eval_prompts)
    report = {"size": args.size, "steps": args.steps, "seeds": args.seeds, "lr": lr, "settings": S,
              "micro_batch": args.micro_batch, "sft": str(sft), "reward": str(rm),
              "import_baseline_rss_mb": baselines, "matmul_gflops": {"start": gflops_start, "end": None},
              "useful_work_per_episode": work_per_episode, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "cpus": os.cpu_count(), "sft_eval": sft_eval, "runs": runs, "errors": errors, "finished": False}

    def write() -> None:  # after every run: a benchmark stopped part-way keeps what it measured
        report["load_average_end"] = os.getloadavg()
        report["summary"] = summarize(report)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    for i, seed in enumerate(args.seeds):  # seeds outside: a change of machine load hits every trainer alike
        for name in names:
            if name in errors or (i and name in args.first_seed_only):
                continue
            out = work / f"{name}-seed{seed}"
            cfg = {"trainer": name, "dataset": str(ds), "sft": str(sft), "reward": str(rm), "out": str(out),
                   "steps": args.steps, "lr": lr, "lora": lora, "seed": seed, "prompts": train_prompts,
                   "micro_batch": args.micro_batch, "settings": S,
                   "result": str(work / f"{name}-seed{seed}.result.json")}
            print(f"[bench] {name} seed {seed}: {args.steps} steps x {S['episodes_per_step']} episodes ...",
                  flush=True)
            r = run_worker(pythons[name], name, cfg, work / f"{name}-seed{seed}.log")
            if "error" in r:
                errors[name] = r
                print(f"[bench] {name} seed {seed}: {r['error']}", flush=True)
                continue
            r["seed"] = seed
            r["rss_above_imports_mb"] = r["peak_rss_mb"] - baselines[name]
            r["useful_gflops"] = r["episodes_per_s"] * work_per_episode["flops"] / 1e9
            r.update(evaluate_policy(out, sft, rm, eval_prompts))
            runs[name].append(r)
            print(f"[bench] {name} seed {seed}: {json.dumps(r)}", flush=True)
            write()
    report["matmul_gflops"]["end"] = matmul_gflops()
    report["finished"] = True
    write()
    print_report(report)
    print(f"written {args.out}")


def summarize(report: dict) -> dict:
    """Mean ± std per trainer over its seeds; the best of ours against each peer."""
    limit = max(v for v in report["matmul_gflops"].values() if v)

    def agg(rs: list[dict], key: str) -> tuple[float, float]:
        xs = [r[key] for r in rs]
        m = sum(xs) / len(xs)
        return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0

    keys = ("episodes_per_s", "peak_rss_mb", "rss_above_imports_mb", "gold", "rm_score", "kl", "eos_rate",
            "useful_gflops")
    summary = {n: {k: agg(rs, k) for k in keys} | {"seeds": len(rs)} for n, rs in report["runs"].items() if rs}
    for m in summary.values():
        m["matmul_fraction"] = m["useful_gflops"][0] / limit
    ours = [n for n in summary if n in OURS]
    best = max(ours, key=lambda n: summary[n]["episodes_per_s"][0]) if ours else None
    for n in summary:
        if best and n in PEERS:
            summary[n]["best_ours"] = best
            summary[n]["ours_speedup"] = summary[best]["episodes_per_s"][0] / summary[n]["episodes_per_s"][0]
            summary[n]["ours_rss_ratio"] = summary[best]["peak_rss_mb"][0] / summary[n]["peak_rss_mb"][0]
            summary[n]["speedup_by_config"] = {o: summary[o]["episodes_per_s"][0] / summary[n]["episodes_per_s"][0]
                                               for o in ours}
    return summary


def print_report(report: dict) -> None:
    import pandas as pd

    def pm(v: tuple[float, float], f: str = ".2f") -> str:
        return f"{v[0]:{f}} ± {v[1]:{f}}" if v[1] else f"{v[0]:{f}}"

    summary, sft_eval = report["summary"], report["sft_eval"]
    rows = [{"trainer": n, "seeds": str(m["seeds"]), "episodes/s": pm(m["episodes_per_s"], ".3f"),
             "peak RSS MB": pm(m["peak_rss_mb"], ".0f"), "above imports MB": pm(m["rss_above_imports_mb"], ".0f"),
             "gold": pm(m["gold"]), "RM score": pm(m["rm_score"]), "KL": pm(m["kl"]), "EOS rate": pm(m["eos_rate"]),
             "of matmul limit": f"{m['matmul_fraction']:.0%}",
             "best ours speed-up": f"{m['ours_speedup']:.2f}x" if "ours_speedup" in m else "",
             "best ours/peer RSS": f"{m['ours_rss_ratio']:.2f}" if "ours_rss_ratio" in m else ""}
            for n, m in summary.items()]
    rows.append({"trainer": "sft (start)", "gold": f"{sft_eval['gold']:.2f}", "RM score": f"{sft_eval['rm_score']:.2f}",
                 "KL": "0", "EOS rate": f"{sft_eval['eos_rate']:.2f}"})
    print(pd.DataFrame(rows).astype(object).fillna("").to_string(index=False))
    g = report["matmul_gflops"]
    best = next((m["best_ours"] for m in summary.values() if "best_ours" in m), None)
    print(f"matmul limit: {g['start']:.1f} GFLOP/s at the start, {g['end'] or 0:.1f} at the end; best of ours: {best}"
          f"{'' if report.get('finished') else ' (the run did not finish: partial)'}")
    for n, e in report["errors"].items():
        print(f"{n}: {e.get('error')}\n{e.get('log_tail', '')}")

if __name__ == "__main__":
    main()
