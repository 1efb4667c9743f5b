"""Sampling uses an explicit generation config (docs/ppo.md #28): whatever the checkpoint's own
generation_config.json says (a repetition penalty, min_p, no-repeat n-grams...), the responses are
those of plain temperature sampling, the distribution the PPO ratio and KL assume."""

from __future__ import annotations

import json
import shutil

import torch

from rlhf.train import generation, models

PROMPTS = ["Say something about the sea.", "Name a colour.", "Count to three.", "What is rain?"]


def _samples(path, cfg) -> torch.Tensor:
    model, tok = models.load_policy(path, cfg, for_training=False)
    ro = generation.sample(model, tok, PROMPTS, max_new_tokens=24, temperature=1.0, generator_seed=11)
    return ro.response_ids


def test_checkpoint_repetition_penalty_is_ignored(sft_model, tiny_cfg, tmp_path):
    plain = _samples(sft_model, tiny_cfg)
    loaded = tmp_path / "with-penalty"
    shutil.copytree(sft_model, loaded)
    gc_file = loaded / "generation_config.json"
    gc = json.loads(gc_file.read_text()) if gc_file.exists() else {}
    gc.update({"repetition_penalty": 50.0, "no_repeat_ngram_size": 1, "min_p": 0.5, "top_k": 5,
               "do_sample": True})
    gc_file.write_text(json.dumps(gc))
    model, _ = models.load_policy(loaded, tiny_cfg, for_training=False)
    assert model.generation_config.repetition_penalty == 50.0  # the checkpoint does carry it
    # the same samples as the checkpoint without those settings: none of them reached the sampler
    assert torch.equal(_samples(loaded, tiny_cfg), plain)
    # and the model's own config is left as it was after sampling
    assert model.generation_config.repetition_penalty == 50.0


def test_sampling_config_is_plain_temperature_sampling(sft_model, tiny_cfg):
    _, tok = models.load_policy(sft_model, tiny_cfg, for_training=False)
    c = generation.sampling_config(tok, max_new_tokens=8, temperature=0.7)
    assert (c.do_sample, c.top_k, c.top_p, c.temperature, c.repetition_penalty, c.num_beams) == \
        (True, 0, 1.0, 0.7, 1.0, 1)
    assert c.pad_token_id == tok.pad_token_id and c.eos_token_id == tok.eos_token_id
