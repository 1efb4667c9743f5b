"""The reward stage: a scalar reward model trained with the Bradley-Terry loss.

``loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected))``; the score is
read at the last real token (EOS) of ``chat_prompt(prompt) + reply + EOS``, the prompt being the
whole conversation before the reply
(docs/ppo.md #8). Over-long inputs are cut from the left so the replies,
where a pair differs, survive (10b). The head starts at std 1/sqrt(hidden+1)
(9). After training we record the mean/std of the scores of the SFT
demonstrations, which PPO uses to normalise rewards (10).

Reported: held-out pairwise accuracy (ties count half), mean margin, and
agreement with the gold annotator on fresh pairs it labels without noise.

The loop is ours for the same reasons as in :mod:`rlhf.train.sft`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.config import ModelConfig, RewardConfig
from rlhf.data import demo
from rlhf.data.prepare import load_split, prompt_conversations
from rlhf.io import atomic_dir, read_manifest, write_manifest
from rlhf.mlops import tracking
from rlhf.train import distributed as D
from rlhf.train import models
from rlhf.train.loop import (
    MicroBatch,
    batches,
    make_optimizer,
    make_scheduler,
    pad_right,
    rank_batches,
    resume_training,
    set_seed,
    train_steps,
)
from rlhf.train.precision import for_model

log = logging.getLogger("rlhf")


def encode_reply(tokenizer, prompt: str | list, reply: str, max_len: int) -> list[int]:
    """``chat_prompt(prompt) + reply + EOS`` as ids, cut from the left to ``max_len``; ``prompt``: a text or
    the conversation before the reply."""
    ids = models.encode_prompt(tokenizer, prompt) + models.encode_text(tokenizer, reply)
    ids.append(tokenizer.eos_token_id)
    return ids[-max_len:]


def score_texts(model, tokenizer, prompts: list[str | list], replies: list[str], max_len: int,
                batch_size: int = 32) -> torch.Tensor:
    """Reward-model scores of (prompt, reply) pairs, shape (n,)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for idx in batches(len(prompts), batch_size, shuffle=False):
            seqs = [encode_reply(tokenizer, prompts[i], replies[i], max_len) for i in idx]
            ids = pad_right(seqs, tokenizer.pad_token_id).to(device)
            mask = pad_right([[1] * len(s) for s in seqs], 0).to(device)
            out.append(models.reward_scores(model, ids, mask).cpu())
    return torch.cat(out) if out else torch.empty(0)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    diff = chosen - rejected
    acc = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()
    return {"accuracy": acc, "mean_margin": diff.mean().item()}


def evaluate_pairs(model, tok, pairs: list[dict], max_len: int, batch_size: int) -> dict[str, float]:
    model.eval()
    prompts = [p["prompt"] for p in pairs]
    c = score_texts(model, tok, prompts, [p["chosen"] for p in pairs], max_len, batch_size)
    r = score_texts(model, tok, prompts, [p["rejected"] for p in pairs], max_len, batch_size)
    return pair_metrics(c, r)


class Scorer(torch.nn.Module):
    """``reward_scores`` as a module's forward, so that DistributedDataParallel sees (and syncs) it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return models.reward_scores(self.model, ids, mask)


def train_reward(dataset: str | Path, sft_model: str | Path | None, out: str | Path,
                 cfg: RewardConfig | None = None, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Train the reward model on the preference split; write it + manifest (with score normalisation).

    Under ``torchrun`` every rank calls this (DDP); ``batch_size`` is per rank; only rank 0 tracks and writes.
    """
    cfg, model_cfg = cfg or RewardConfig(), model_cfg or ModelConfig()
    info = D.setup()
    try:
        return _train_reward(dataset, sft_model, out, cfg, model_cfg, info)
    finally:
        D.teardown(info)


def _train_reward(dataset, sft_model, out, cfg: RewardConfig, model_cfg: ModelConfig,
                  info: D.DistInfo) -> dict[str, Any]:
    set_seed(cfg.seed)
    train_df = load_split(dataset, "preferences", "train")
    eval_df = load_split(dataset, "preferences", "eval").head(cfg.eval_max_rows)
    if cfg.init_from == "sft" and sft_model is not None:
        read_manifest(sft_model, expect_kind="policy")
        source = sft_model
    else:
        from rlhf.data.prepare import dataset_texts

        source = models.resolve_base(model_cfg, dataset_texts(dataset) if model_cfg.name == "tiny" else None)
    model, tok = models.load_reward_model(source, model_cfg, for_training=True, init_from_causal=True)
    device = next(model.parameters()).device
    enc = [(encode_reply(tok, p, c, cfg.max_seq_len), encode_reply(tok, p, r, cfg.max_seq_len))
           for p, c, r in zip(prompt_conversations(train_df), train_df["chosen"], train_df["rejected"])]
    eval_pairs = [{"prompt": p, "chosen": c, "rejected": r}
                  for p, c, r in zip(prompt_conversations(eval_df), eval_df["chosen"], eval_df["rejected"])]
    eval_prompts = load_split(dataset, "prompts", "eval")["prompt"].tolist()
    gold_prompts = [p for p in eval_prompts if demo.topic_of(p)]
    gold_pairs = demo.fresh_pairs(cfg.gold_pairs, seed=cfg.seed + 777, prompts=gold_prompts) \
        if gold_prompts and cfg.gold_pairs else []

    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    total = cfg.max_steps or max(1, int(math.ceil(len(enc) / global_batch) * cfg.epochs))
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, total, cfg.warmup_ratio)
    precision = for_model(model, model_cfg)
    scorer = D.wrap(Scorer(model), info)  # DDP must see the forward pass: reward_scores bypasses model()

    def loss_fn(idx: list[int]) -> MicroBatch:
        seqs = [enc[i][0] for i in idx] + [enc[i][1] for i in idx]
        ids = pad_right(seqs, tok.pad_token_id).to(device)
        mask = pad_right([[1] * len(s) for s in seqs], 0).to(device)
        scores = scorer(ids, mask).float()
        rc, rr = scores[: len(idx)], scores[len(idx):]
        diff = (rc - rr).detach()
        stats = {"batch_accuracy": float(((diff > 0).float() + 0.5 * (diff == 0).float()).sum()),
                 "batch_mean_margin": float(diff.sum()), "tokens": float(mask.sum())}
        return MicroBatch(-F.logsigmoid(rc - rr).sum(), stats)

    run_ctx = tracking.stage_run("reward", cfg, tags={"model": model_cfg.name, "world_size": info.world_size}) \
        if info.is_main else contextlib.nullcontext(tracking.Tracker(None))
    with run_ctx as tracker:
        tracker.log_params({"model": model_cfg.model_dump(mode="json")})
        models.disable_dropout(model)
        inputs = {"dataset": dataset, **({"sft_model": sft_model} if source == sft_model else {})}
        checkpoints, start = resume_training("reward", out, cfg, model_cfg, inputs, info, total, model, opt, sched,
                                             precision)
        if start:
            tracker.set_tags({"resumed_from_step": start})
        batch_iter = rank_batches(len(enc), cfg.batch_size, info.rank, info.world_size, random.Random(cfg.seed))
        step, last = train_steps("reward", scorer, opt, sched, total, batch_iter, cfg.grad_accum, len, loss_fn,
                                 cfg.max_grad_norm, precision, info, tracker, cfg.log_every,
                                 checkpoints=checkpoints, start_step=start, saved=model)
        held_out = evaluate_pairs(model, tok, eval_pairs, cfg.max_seq_len, cfg.batch_size)
        gold = evaluate_pairs(model, tok, gold_pairs, cfg.max_seq_len, cfg.batch_size) if gold_pairs else {}
        sft_eval = load_split(dataset, "sft", "eval").head(cfg.eval_max_rows)
        ref = score_texts(model, tok, prompt_conversations(sft_eval), sft_eval["response"].tolist(),
                          cfg.max_seq_len, cfg.batch_size)
        norm = {"mean": ref.mean().item() if len(ref) else 0.0,
                "std": ref.std().item() if len(ref) > 1 else 1.0}
        metrics = {
            "train_loss": last.get("loss", float("nan")),
            "eval_accuracy": held_out["accuracy"],
            "eval_mean_margin": held_out["mean_margin"],
            "gold_agreement": gold.get("accuracy", float("nan")),
            "gold_pairs": len(gold_pairs),
            "steps": step,
            "world_size": info.world_size,
            "seconds": last["seconds"],
            "samples_per_s": (step - start) * global_batch / max(last["seconds"], 1e-9),
            "resumed_from_step": start,
        }
        if info.is_main:
            tracker.log_metrics(metrics)
            with atomic_dir(out) as tmp:
                models.save_model(model, tok, tmp, merge_lora=True)
                if cfg.save_adapter and model_cfg.lora:  # for ppo.reward adapter (docs/ppo.md #32)
                    models.save_model(model, tok, tmp / "adapter", merge_lora=False)
                write_manifest(tmp, kind="reward-model", inputs={"dataset": dataset, **(
                    {"sft_model": sft_model} if sft_model else {})}, config=cfg, metrics=metrics,
                    extra={"model": model_cfg.model_dump(mode="json"), "reward_norm": norm,
                           "max_seq_len": cfg.max_seq_len, "mlflow_run_id": tracker.run_id})
            checkpoints.remove()
    D.barrier()
    log.info("[reward] held-out accuracy %.3f, gold agreement %.3f, margin %.3f; model in %s",
             metrics["eval_accuracy"], metrics["gold_agreement"], metrics["eval_mean_margin"], out)
    return metrics
