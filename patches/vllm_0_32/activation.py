"""Activation steering inside vLLM 0.32's model: the decoder layers wrapped by the steering ops.

After the runner loads the model, and before anything runs it (vLLM compiles it, captures CUDA graphs and
warms it up on the first forwards), :func:`wrap_decoder_layers` replaces every decoder layer of the model's
layer list by a :class:`SteeredDecoderLayer`: the original layer, then ``steer_gate`` and
``steer_activations`` over the layer's output (``docs/activation-steering.md``). The ops read persistent
buffers only (the vector bank, the op and gate tables, the per-token row index), registered as the
wrapper's non-persistent buffers, so ``torch.compile`` (vLLM's ``@support_torch_compile`` on the model)
traces them into the graph as static inputs and a CUDA graph replays them with whatever the tables hold.

Every layer is wrapped (a request may steer at any layer); a step in which no token is steered costs one
pass-through copy of the layer output and a gate scan per layer. With a ``capture`` section, each wrapper
also copies the stream of capturing tokens (``capture_layers``) into its layer's buffer (``capture_stream``).

Layer outputs: vLLM's decoder layers return ``(hidden_states, residual)`` (the residual stream is their
sum; ``residual`` is None never after the first layer in vLLM 0.32's Llama-family models, but a ``None`` is
handled as "no fused residual") or a single tensor (the stream itself), as token rows ``[T, H]``; the layers of
vLLM's Transformers backend (the HF modules) return ``[1, T, H]``, steered as the same rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from value_steer.kernels import capture_stream, steer_activations, steer_gate
from value_steer.runtime.activation import ActivationTables


class SteeredDecoderLayer(nn.Module):
    """A decoder layer followed by the activation-steering ops of its index.

    Args:
        layer: the original decoder layer (kept as the submodule ``layer``).
        index: its position in the model's layer list (the ``layer`` of the request spec).
        tables: the runner's :class:`ActivationTables` (their device tensors become this module's buffers).
    """

    def __init__(self, layer: nn.Module, index: int, tables: ActivationTables) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        bufs = {
            "token_row": tables.token_row,
            "token_decode": tables.token_decode,
            "gate": tables.gate,
            "bank": tables.bank.table,
        }
        for name, t in zip(ActivationTables.OP_COLUMNS, tables.op_tables(index)):
            bufs[name] = t
        for name, t in zip(("gate_slot", "gate_threshold", "gate_sharpness"), tables.gate_tables(index)):
            bufs[name] = t
        cap = tables.capture_tables(index)
        self.captures = cap is not None  # fixed at load: the compiled graph has the capture op or not
        if cap is not None:
            bufs["capture_flag"], bufs["capture_buf"] = cap
        for name, t in bufs.items():
            # Views of the tables: in-place updates of the tables are what the ops read.
            self.register_buffer(f"vs_{name}", t, persistent=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*args, **kwargs)
        pair = isinstance(out, tuple)
        hidden = out[0] if pair else out
        residual = out[1] if pair and len(out) > 1 and out[1] is not None else None
        # The ops take token rows [T, H]. vLLM's own models give that; its Transformers backend (OLMo 2, ...) gives
        # the HF layout [1, T, H]: a view of the same rows, and the edited rows go back in the layer's own shape.
        shape = hidden.shape
        if hidden.dim() < 2 or (residual is not None and residual.shape != shape):
            raise RuntimeError(f"value_steer: activation steering cannot steer {type(self.layer).__name__}'s output "
                               f"(hidden {tuple(shape)}, residual "
                               f"{None if residual is None else tuple(residual.shape)}): it needs token rows [..., H] "
                               "and a residual of the same shape")
        rows = hidden.reshape(-1, shape[-1]) if hidden.dim() != 2 else hidden
        res_rows = (residual.reshape(-1, shape[-1]) if residual.dim() != 2 else residual) if residual is not None \
            else hidden.new_empty(0)
        steer_gate(rows, res_rows, self.vs_token_row, self.vs_bank, self.vs_gate_slot, self.vs_gate_threshold,
                   self.vs_gate_sharpness, self.vs_gate)
        steered = steer_activations(rows, res_rows, self.vs_token_row, self.vs_token_decode, self.vs_gate,
                                    self.vs_bank, self.vs_op_kind, self.vs_op_slot, self.vs_op_a, self.vs_op_b,
                                    self.vs_op_flags)
        if self.captures:
            # The stream after this layer's edits: what the next layer reads.
            capture_stream(steered, res_rows, self.vs_token_row, self.vs_capture_flag, self.vs_capture_buf)
        if steered.shape != shape:
            steered = steered.reshape(shape)
        return (steered, *out[1:]) if pair else steered


# Where a decoder layer list may live: the attribute names vLLM's models (and the HF models its Transformers backend
# wraps) give it, under any parent (model.layers, model.model.layers, language_model.model.layers, transformer.h).
LAYER_LIST_NAMES = ("layers", "h", "blocks", "block", "decoder_layers")
# Multimodal wrappers hold a vision tower's layer list too: the language model's is preferred.
TEXT_PARENTS = ("language_model", "text_model", "text_decoder")


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's decoder layer list: the ``nn.ModuleList`` named one of :data:`LAYER_LIST_NAMES` with
    ``num_layers`` entries (``model.model.layers`` in vLLM's Llama-family models; under ``language_model`` in
    multimodal ones). Raises naming the model class and what was looked for when there is not exactly one."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == num_layers
             and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES]
    if len(found) > 1:
        text = [(n, m) for n, m in found if any(p in n.split(".") for p in TEXT_PARENTS)]
        found = text or found
    if len(found) != 1:
        names = [n for n, _ in found] or "none"
        raise RuntimeError(f"value_steer: activation steering needs exactly one decoder layer list of {num_layers} "
                           f"layers in {type(model).__name__} (an nn.ModuleList named one of {list(LAYER_LIST_NAMES)}"
                           f"); found {names}")
    return found[0][1]


def wrap_decoder_layers(model: nn.Module, tables: ActivationTables) -> int:
    """Wrap every decoder layer of ``model`` (idempotent); returns the number of layers wrapped."""
    layers = decoder_layers(model, tables.num_layers)
    wrapped = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, SteeredDecoderLayer):
            continue
        layers[i] = SteeredDecoderLayer(layer, i, tables)
        wrapped += 1
    return wrapped


def num_decoder_layers(vllm_config: Any) -> int:
    """The model's decoder layers (the index range of a spec's ``layer``)."""
    return int(vllm_config.model_config.get_num_layers(vllm_config.parallel_config))


def max_forward_tokens(runner: Any) -> int:
    """Tokens one forward of the runner may carry (VFD's runner config includes the candidates' rows)."""
    return int(runner.max_num_tokens)


def measure_residual_norms(runner: Any, num_tokens: int = 128, seed: int = 0) -> tuple[float, ...]:
    """Each decoder layer's typical residual-stream norm: the median over tokens of ``|hidden + residual|`` (the
    stream the steering ops edit) in one eager prefill of ``num_tokens`` seeded random token ids, the first token
    left out (its attention-sink norms are atypical). The reference of ``steering.max_relative_dose``.

    Runs after vLLM's warm-up (the KV cache exists, graphs are compiled or captured): one request through vLLM's own
    ``_dummy_run`` with attention metadata, the compiled model bypassed (``do_not_compile``), forward hooks on the
    wrapped layers only for this call. Returns ``[num_layers]`` floats.
    """
    model = runner.get_model()
    layers = [m for m in model.modules() if isinstance(m, SteeredDecoderLayer)]
    if not layers:
        raise RuntimeError("value_steer: measure_residual_norms needs the wrapped decoder layers")
    n = max(2, min(num_tokens, int(runner.max_num_tokens), int(runner.model_config.max_model_len)))
    norms: dict[int, float] = {}

    def hook(module: SteeredDecoderLayer, _args: Any, out: Any) -> None:
        hidden = out[0] if isinstance(out, tuple) else out
        resid = out[1] if isinstance(out, tuple) and len(out) > 1 and out[1] is not None else None
        stream = (hidden.float() + resid.float()) if resid is not None else hidden.float()
        stream = stream.reshape(-1, stream.shape[-1])[1:n]
        norms[module.index] = float(stream.norm(dim=-1).median())

    compiled = [m for m in model.modules() if hasattr(m, "do_not_compile")]
    saved = [m.do_not_compile for m in compiled]
    handles = [m.register_forward_hook(hook) for m in layers]
    sched = runner.scheduler_config
    max_seqs = sched.max_num_seqs
    gen = torch.Generator().manual_seed(seed)
    vocab = int(runner.model_config.get_vocab_size())
    ids = torch.randint(min(100, vocab - 1), vocab, (n,), generator=gen, dtype=torch.int32)
    try:
        for m in compiled:
            m.do_not_compile = True
        sched.max_num_seqs = 1  # _dummy_run splits its tokens over max_num_seqs requests: one prefill of n
        runner.input_ids.gpu[:n].copy_(ids.to(runner.input_ids.gpu.device))
        runner.positions[:n].copy_(torch.arange(n, device=runner.positions.device))
        with torch.inference_mode():
            runner._dummy_run(n, force_attention=True)
    finally:
        sched.max_num_seqs = max_seqs
        for m, v in zip(compiled, saved):
            m.do_not_compile = v
        for h in handles:
            h.remove()
        runner.input_ids.gpu[:n].zero_()
        runner.positions[:n].zero_()
    missing = [i for i in range(len(layers)) if i not in norms]
    if missing:
        raise RuntimeError(f"value_steer: no residual norm measured at layers {missing}")
    return tuple(norms[i] for i in range(len(layers)))
