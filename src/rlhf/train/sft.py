"""The SFT stage: supervised fine-tuning of the policy on demonstrations.

Loss on response tokens only: each example is the prompt rendered with the
model's chat template (assistant header included) followed by the response
and EOS; the prompt tokens get label -100.

We write the loop ourselves (about 100 lines) instead of using TRL's
``SFTTrainer`` because (1) the tokenisation, masking and model loading are the
same code the reward and PPO stages use (one place for each piece of logic);
(2) per-step metrics go straight to :mod:`rlhf.mlops.tracking` and the progress line;
(3) on small models on CPU the trainer's overhead is measurable
(``benchmarks/sft_reward_vs_trl.py`` compares both on identical settings).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from rlhf.config import ModelConfig, SFTConfig
from rlhf.data.prepare import dataset_texts, load_split
from rlhf.io import atomic_dir, write_manifest
from rlhf.mlops import tracking
from rlhf.train import models
from rlhf.train.loop import Progress, batches, make_optimizer, make_scheduler, pad_right, set_seed

log = logging.getLogger("rlhf")


def encode(tokenizer, prompt: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt masked with -100) of one demonstration; the prompt is cut from the left."""
    p_ids = models.encode_prompt(tokenizer, prompt)
    r_ids = models.encode_text(tokenizer, response) + [tokenizer.eos_token_id]
    r_ids = r_ids[: max_len - 8] if len(r_ids) > max_len - 8 else r_ids
    p_ids = p_ids[-(max_len - len(r_ids)):]
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids = pad_right([e[0] for e in examples], pad_id)
    labels = pad_right([e[1] for e in examples], pad_id, fill=-100)
    return {"input_ids": ids, "attention_mask": (labels != -100) | (ids != pad_id), "labels": labels}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over response tokens; also the number of such tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    n = int((labels != -100).sum())
    return loss / max(n, 1), n


@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for idx in batches(len(examples), batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        loss, n = lm_loss(model, batch)
        total += loss.item() * n
        count += n
    return total / max(count, 1)


def train_sft(dataset: str | Path, out: str | Path, cfg: SFTConfig | None = None,
              model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Fine-tune the base policy on the SFT split; write the policy + manifest to ``out``."""
    cfg, model_cfg = cfg or SFTConfig(), model_cfg or ModelConfig()
    set_seed(cfg.seed)
    train_df, eval_df = load_split(dataset, "sft", "train"), load_split(dataset, "sft", "eval")
    corpus = dataset_texts(dataset) if model_cfg.name == "tiny" else None
    model, tok = models.load_policy(model_cfg, model_cfg, for_training=True, corpus=corpus)
    device = next(model.parameters()).device
    train = [encode(tok, p, r, cfg.max_seq_len) for p, r in zip(train_df["prompt"], train_df["response"])]
    evals = [encode(tok, p, r, cfg.max_seq_len) for p, r in
             zip(eval_df["prompt"][: cfg.eval_max_rows], eval_df["response"][: cfg.eval_max_rows])]

    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, total, cfg.warmup_ratio)
    rng = random.Random(cfg.seed)

    with tracking.stage_run("sft", cfg, tags={"model": model_cfg.name}) as tracker:
        tracker.log_params({"model": model_cfg.model_dump(mode="json")})
        before = eval_loss(model, evals, tok.pad_token_id, cfg.batch_size, device)
        progress = Progress("sft", total, cfg.log_every)
        step, micro, last = 0, 0, {}
        model.train()
        models.disable_dropout(model)
        while step < total:
            for idx in batches(len(train), cfg.batch_size, shuffle=True, rng=rng):
                batch = {k: v.to(device) for k, v in collate([train[i] for i in idx], tok.pad_token_id).items()}
                loss, n_tok = lm_loss(model, batch)
                (loss / cfg.grad_accum).backward()
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                last = {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]}
                rate = progress.step(step, last, tokens=int(batch["attention_mask"].sum()))
                tracker.log_metrics({**last, **rate}, step=step)
                if step >= total:
                    break
        after = eval_loss(model, evals, tok.pad_token_id, cfg.batch_size, device)
        metrics = {
            "train_loss": last.get("loss", float("nan")),
            "eval_loss_before": before,
            "eval_loss": after,
            "eval_perplexity": math.exp(min(after, 50)),
            "steps": step,
            "train_examples": len(train),
            "seconds": progress.elapsed,
            "samples_per_s": step * cfg.batch_size * cfg.grad_accum / max(progress.elapsed, 1e-9),
        }
        tracker.log_metrics(metrics)
        with atomic_dir(out) as tmp:
            models.save_model(model, tok, tmp, merge_lora=cfg.merge_lora)
            write_manifest(tmp, kind="policy", inputs={"dataset": dataset}, config=cfg, metrics=metrics,
                           extra={"model": model_cfg.model_dump(mode="json"), "stage": "sft",
                                  "mlflow_run_id": tracker.run_id})
    log.info("[sft] eval loss %.3f -> %.3f (perplexity %.2f); policy in %s", before, after,
             metrics["eval_perplexity"], out)
    return metrics
