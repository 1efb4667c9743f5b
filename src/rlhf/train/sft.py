"""The SFT stage: supervised fine-tuning of the policy on demonstrations.

Loss on response tokens only: each example is the prompt (its whole conversation, each turn a
turn of the model's chat template, assistant header included) followed by the response and EOS;
the prompt tokens, earlier assistant turns included, get label -100.

We write the loop ourselves (about 100 lines) instead of using TRL's
``SFTTrainer`` because (1) the tokenisation, masking and model loading are the
same code the reward and PPO stages use (one place for each piece of logic);
(2) per-step metrics go straight to :mod:`rlhf.mlops.tracking` and the progress line;
(3) on small models on CPU the trainer's overhead is measurable
(``benchmarks/sft_reward_vs_trl.py`` compares both on identical settings).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from rlhf.config import ModelConfig, SFTConfig
from rlhf.data.prepare import dataset_texts, load_split, prompt_conversations
from rlhf.io import atomic_dir, write_manifest
from rlhf.mlops import tracking
from rlhf.train import distributed as D
from rlhf.train import generation, models
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
from rlhf.train.precision import Precision, for_model

log = logging.getLogger("rlhf")


def encode(tokenizer, prompt: str | list, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt masked with -100) of one demonstration; the prompt is cut from the left.

    ``prompt``: a text or the conversation before the reply (``models.encode_prompt``); only the
    final reply is learnt."""
    p_ids = models.encode_prompt(tokenizer, prompt)
    r_ids = models.encode_text(tokenizer, response) + [tokenizer.eos_token_id]
    r_ids = r_ids[: max_len - 8] if len(r_ids) > max_len - 8 else r_ids
    p_ids = p_ids[-(max_len - len(r_ids)):]
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    ids = pad_right([e[0] for e in examples], pad_id)
    labels = pad_right([e[1] for e in examples], pad_id, fill=-100)
    return {"input_ids": ids, "attention_mask": (labels != -100) | (ids != pad_id), "labels": labels}


def lm_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The sum of the next-token cross-entropy over response tokens, and the number of such tokens.

    Only the positions from the batch's earliest response token on predict a label: where the model takes
    ``logits_to_keep``, the LM head and the cross-entropy run on those positions alone (the same loss; on
    the tiny profile's SFT 31 % of the positions are prompt before every response of the batch, and a
    step takes ~10 % less time)."""
    labels = batch["labels"][:, 1:]
    first, keep = 0, {}
    answered = (labels != -100).any(1)
    if answered.any() and generation.accepts_logits_to_keep(model):
        first = int((labels != -100).float().argmax(1)[answered].min())
        keep = {"logits_to_keep": torch.arange(first, labels.shape[1], device=labels.device)}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), **keep)
    logits = (out.logits if keep else out.logits[:, :-1]).float()
    labels = labels[:, first:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int, device, precision: Precision | None = None) -> float:
    """Mean token loss over ``examples`` (every rank computes the same number on its identical model)."""
    model.eval()
    total, count = 0.0, 0
    for idx in batches(len(examples), batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with (precision or Precision.off()).autocast():
            loss, n = lm_loss_sum(model, batch)
        total += float(loss)
        count += n
    return total / max(count, 1)


def train_sft(dataset: str | Path, out: str | Path, cfg: SFTConfig | None = None,
              model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Fine-tune the base policy on the SFT split; write the policy + manifest to ``out``.

    Under ``torchrun`` every rank calls this (DDP, :func:`rlhf.train.loop.train_steps`); ``batch_size`` is
    per rank; only rank 0 tracks and writes.
    """
    cfg, model_cfg = cfg or SFTConfig(), model_cfg or ModelConfig()
    info = D.setup()
    try:
        return _train_sft(dataset, out, cfg, model_cfg, info)
    finally:
        D.teardown(info)


def _train_sft(dataset, out, cfg: SFTConfig, model_cfg: ModelConfig, info: D.DistInfo) -> dict[str, Any]:
    set_seed(cfg.seed)
    train_df, eval_df = load_split(dataset, "sft", "train"), load_split(dataset, "sft", "eval")
    corpus = dataset_texts(dataset) if model_cfg.name == "tiny" else None
    model, tok = models.load_policy(model_cfg, model_cfg, for_training=True, corpus=corpus)
    models.disable_dropout(model)
    device = next(model.parameters()).device
    precision = for_model(model, model_cfg)
    train = [encode(tok, p, r, cfg.max_seq_len) for p, r in zip(prompt_conversations(train_df), train_df["response"])]
    eval_df = eval_df.head(cfg.eval_max_rows)
    evals = [encode(tok, p, r, cfg.max_seq_len) for p, r in zip(prompt_conversations(eval_df), eval_df["response"])]

    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    total = cfg.max_steps or max(1, int(math.ceil(len(train) / global_batch) * cfg.epochs))
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = make_scheduler(opt, total, cfg.warmup_ratio)
    trained = D.wrap(model, info)

    def collated(idx: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in collate([train[i] for i in idx], tok.pad_token_id).items()}

    def units(idx: list[int]) -> int:  # response tokens, the loss's unit (the label shift drops none of them)
        return sum(sum(1 for t in train[i][1][1:] if t != -100) for i in idx)

    def loss_fn(idx: list[int]) -> MicroBatch:
        batch = collated(idx)
        loss, _ = lm_loss_sum(trained, batch)
        return MicroBatch(loss, {"tokens": float(batch["attention_mask"].sum())})

    run_ctx = tracking.stage_run("sft", cfg, tags={"model": model_cfg.name, "world_size": info.world_size}) \
        if info.is_main else contextlib.nullcontext(tracking.Tracker(None))
    with run_ctx as tracker:
        tracker.log_params({"model": model_cfg.model_dump(mode="json")})
        before = eval_loss(model, evals, tok.pad_token_id, cfg.batch_size, device, precision)  # of the initial model
        checkpoints, start = resume_training("sft", out, cfg, model_cfg, {"dataset": dataset}, info, total, model,
                                             opt, sched, precision)
        if start:
            tracker.set_tags({"resumed_from_step": start})
        batch_iter = rank_batches(len(train), cfg.batch_size, info.rank, info.world_size, random.Random(cfg.seed))
        step, last = train_steps("sft", trained, opt, sched, total, batch_iter, cfg.grad_accum, units, loss_fn,
                                 cfg.max_grad_norm, precision, info, tracker, cfg.log_every,
                                 checkpoints=checkpoints, start_step=start, saved=model)
        after = eval_loss(model, evals, tok.pad_token_id, cfg.batch_size, device, precision)
        metrics = {
            "train_loss": last.get("loss", float("nan")),
            "eval_loss_before": before,
            "eval_loss": after,
            "eval_perplexity": math.exp(min(after, 50)),
            "steps": step,
            "train_examples": len(train),
            "world_size": info.world_size,
            "seconds": last["seconds"],
            "samples_per_s": (step - start) * global_batch / max(last["seconds"], 1e-9),
            "resumed_from_step": start,
        }
        if info.is_main:
            tracker.log_metrics(metrics)
            with atomic_dir(out) as tmp:
                models.save_model(model, tok, tmp, merge_lora=cfg.merge_lora)
                write_manifest(tmp, kind="policy", inputs={"dataset": dataset}, config=cfg, metrics=metrics,
                               extra={"model": model_cfg.model_dump(mode="json"), "stage": "sft",
                                      "mlflow_run_id": tracker.run_id})
            checkpoints.remove()
    D.barrier()
    log.info("[sft] eval loss %.3f -> %.3f (perplexity %.2f); policy in %s", before, after,
             metrics["eval_perplexity"], out)
    return metrics
