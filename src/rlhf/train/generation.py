"""Sampling and log-probabilities, shared by PPO and evaluation.

* Prompts are rendered with the chat template and left-padded (docs/ppo.md #2);
  ``generate`` uses the KV cache and its own position handling (we pass no
  position ids to it).
* Sampling is pure temperature sampling: ``do_sample=True, top_k=0, top_p=1``
  (4), from an explicit :func:`sampling_config`; the checkpoint's own
  ``generation_config`` (repetition penalty, ``min_p``, no-repeat n-grams...) is
  set aside while sampling, so nothing inherited changes the distribution
  (docs/ppo.md #28). The same temperature divides the logits whenever
  log-probabilities are computed for training or KL (5).
* A response stops at the first EOS; everything after it is padding and masked
  out (6). A response that never emits EOS within the budget is flagged
  (``has_eos = False``) so the caller can penalise it (11).
* Forward passes over left-padded sequences use ``position_ids = cumsum(mask) - 1``
  clipped at 0 (2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhf.train import models


@dataclass
class Rollout:
    query_ids: torch.Tensor       # (B, Q) left-padded prompt ids
    query_mask: torch.Tensor      # (B, Q)
    response_ids: torch.Tensor    # (B, R) right-padded response ids (pad after EOS)
    response_mask: torch.Tensor   # (B, R) 1 on response tokens up to and including EOS
    has_eos: torch.Tensor         # (B,) bool
    texts: list[str]              # decoded responses (without EOS)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


def encode_prompts(tokenizer, prompts: list[str | list], max_prompt_len: int, device) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Chat-rendered prompts (texts, or conversations: ``models.encode_prompt``), truncated from the left to
    ``max_prompt_len`` tokens, left-padded."""
    seqs = [models.encode_prompt(tokenizer, p)[-max_prompt_len:]
            for p in prompts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def truncate_after_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                           torch.Tensor]:
    """Keep tokens up to and including the first EOS; pad and mask everything after it."""
    is_eos = response_ids == eos_id
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, response_ids.shape[1],
                                                                           dtype=torch.long))
    pos = torch.arange(response_ids.shape[1], device=response_ids.device)
    mask = (pos[None, :] <= first[:, None]).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, has_eos


def sampling_config(tokenizer, *, max_new_tokens: int, temperature: float):
    """The whole sampling configuration: temperature sampling over the full vocabulary, nothing else."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, num_beams=1, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
                            temperature=temperature, repetition_penalty=1.0, no_repeat_ngram_size=0,
                            max_new_tokens=max_new_tokens, min_new_tokens=1, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                            use_cache=True)


@contextlib.contextmanager
def without_inherited_generation_config(model):
    """Set aside the ``generation_config`` the checkpoint brought (on every module that holds one, under
    DDP/PEFT wrappers too): ``generate`` fills the fields we leave unset from it, so while this is active
    only :func:`sampling_config` and the library's neutral defaults apply."""
    from transformers import GenerationConfig

    saved = [(m, m.__dict__["generation_config"]) for m in model.modules()
             if isinstance(m.__dict__.get("generation_config"), GenerationConfig)]
    try:
        for m, _ in saved:
            m.__dict__["generation_config"] = GenerationConfig()
        yield
    finally:
        for m, gc in saved:
            m.__dict__["generation_config"] = gc


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str | list], *, max_new_tokens: int, temperature: float,
           max_prompt_len: int = 256, generator_seed: int | None = None) -> Rollout:
    """Sample one response per prompt (temperature sampling, KV cache, stop at EOS)."""
    device = next(model.parameters()).device
    q_ids, q_mask = encode_prompts(tokenizer, prompts, max_prompt_len, device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    config = sampling_config(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature)
    with without_inherited_generation_config(model):
        out = model.generate(input_ids=q_ids, attention_mask=q_mask, generation_config=config)
    if was_training:
        model.train()
    resp = out[:, q_ids.shape[1]:]
    if resp.shape[1] < max_new_tokens:  # keep a fixed response budget (docs/ppo.md #3)
        pad = torch.full((resp.shape[0], max_new_tokens - resp.shape[1]), tokenizer.pad_token_id,
                         dtype=resp.dtype, device=resp.device)
        resp = torch.cat([resp, pad], 1)
    resp, r_mask, has_eos = truncate_after_eos(resp, tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(torch.where(resp == tokenizer.eos_token_id, tokenizer.pad_token_id, resp),
                                   skip_special_tokens=True)
    return Rollout(q_ids, q_mask, resp, r_mask, has_eos, [t.strip() for t in texts])


def response_logits(model, rollout_or_ids: Rollout | torch.Tensor, attention_mask: torch.Tensor | None = None,
                    query_len: int | None = None, temperature: float = 1.0, with_hidden: bool = False):
    """Logits (divided by ``temperature``) that predict each response token: shape (B, R, V).

    ``with_hidden``: ``(logits, last_hidden_state)``, the latter (B, T, H) over all positions, from
    the same forward pass (PPO's ``critic: shared`` reads its value head there).
    """
    if isinstance(rollout_or_ids, Rollout):
        ids, mask, query_len = rollout_or_ids.input_ids, rollout_or_ids.attention_mask, \
            rollout_or_ids.query_ids.shape[1]
    else:
        ids, mask = rollout_or_ids, attention_mask
    # Only the R positions that predict response tokens (query_len - 1 ... T - 2) need the LM head and
    # its (B, R, V) output: hand them to the model as ``logits_to_keep`` positions when it takes them.
    # An index tensor rather than "the last R + 1": the gathered hidden states are contiguous (a plain
    # matmul for the head; a strided slice goes through a ~2x slower batched matmul on CPU), and no
    # (B, R + 1, V) logits are made only to be sliced (whose backward would allocate another one).
    n_resp = ids.shape[1] - query_len
    keep = {"logits_to_keep": torch.arange(query_len - 1, ids.shape[1] - 1, device=ids.device)} \
        if accepts_logits_to_keep(model) else {}
    if with_hidden:
        keep["output_hidden_states"] = True
    out = model(input_ids=ids, attention_mask=mask, position_ids=models.position_ids_from_mask(mask),
                use_cache=False, **keep)
    logits = out.logits if keep and out.logits.shape[1] == n_resp else out.logits[:, -(n_resp + 1) : -1]
    logits = logits.float()
    if not torch.is_grad_enabled():  # no autograd graph to keep intact: divide in place, no second (B, R, V) copy
        logits = logits.div_(temperature)
    else:
        logits = logits / temperature
    return (logits, out.hidden_states[-1]) if with_hidden else logits


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any DDP/PEFT wrappers takes ``logits_to_keep`` in its forward."""
    import inspect

    inner = getattr(model, "module", model)  # DistributedDataParallel
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token: (B, R)."""
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits`` and the per-token entropy from one ``log_softmax`` (values identical to
    computing them separately): (B, R) each. With the full vocabulary (SmolLM2: 49152) every (B, R, V)
    temporary counts, so this keeps one log-softmax and one product alive instead of two of each."""
    logp = logits.log_softmax(-1)
    logprobs = torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    p_logp = p * logp if logp.requires_grad else p.mul_(logp)  # in place only without a graph (exp saves p)
    return logprobs, -p_logp.sum(-1)


def response_logprobs(model, rollout: Rollout, temperature: float, batch_size: int = 32) -> torch.Tensor:
    """Per-token log-probs of the rollout's responses under ``model`` (0 on masked positions)."""
    out = []
    for i in range(0, rollout.query_ids.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        ids = torch.cat([rollout.query_ids[sl], rollout.response_ids[sl]], 1)
        mask = torch.cat([rollout.query_mask[sl], rollout.response_mask[sl]], 1)
        logits = response_logits(model, ids, mask, rollout.query_ids.shape[1], temperature)
        out.append(logprobs_from_logits(logits, rollout.response_ids[sl]) * rollout.response_mask[sl])
    return torch.cat(out)
