"""Activation memory of a decoder layer: what autograd saves for backward, and what a forward
pass holds at its widest point when nothing is saved (inference).

Pure functions of the model's dimensions and of which parts are trainable. The rules follow
how PyTorch autograd saves tensors, checked tensor by tensor against
``measure.saved_activation_bytes`` on real models:

* a linear layer saves its input only when its *weight* is trainable (the input gradient
  needs only the weight); LoRA's ``lora_A`` saves the same input (or, with dropout, its own
  dropped-out copy and a one-byte mask), ``lora_B`` saves the rank-``r`` intermediate;
* Llama-style RMSNorm upcasts to fp32 and saves that fp32 input, saves the normalized
  tensor only when its weight is trainable, and its output is saved by the linears reading it;
* the gated MLP saves gate, activation and up outputs (3 x intermediate) when a gradient
  flows through it, plus the product when ``down_proj`` saves its input;
* ``sdpa``/flash attention save q, k, v, the output and a per-head fp32 log-sum-exp;
  ``eager`` saves the key/value repeated to every head and the softmax matrix
  (heads x seq x seq, fp32, plus a copy in the compute dtype when that is 16-bit);
* with gradient checkpointing each layer keeps only its input, and one layer is recomputed
  at a time during backward.

Everything is bytes per *one sequence*; the caller multiplies by the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .shapes import ModelShape

ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
ATTENTION_IMPLEMENTATIONS = (
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
    "hf_efficiency_flash",
)
MATERIALIZES_SCORES = ("eager",)


@dataclass
class LayerTraining:
    """Which parts of one decoder layer train, as the activation rules need them."""

    grad_in: bool = False  # the layer's input needs a gradient (something below trains)
    norm_trainable: bool = False  # input / post-attention norm weights
    weight_trainable: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(ROLES, False))
    lora_modules: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    lora_rank: int = 0
    lora_dropout: float = 0.0
    dropout_mask_bytes: int = 1  # bool mask of CUDA's fused dropout; CPU keeps a float mask
    adapter_size: int = 0
    adapter_count: int = 1  # 2 for Houlsby placement (after attention and after the MLP)
    adapter_keeps_both: bool = False  # the nonlinearity saves its input (silu, gelu) besides relu's output
    bias_trainable: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(ROLES, False))  # BitFit

    @property
    def trains(self) -> bool:
        return (
            self.norm_trainable
            or any(self.bias_trainable.values())
            or any(self.weight_trainable.values())
            or any(self.lora_modules.values())
            or self.adapter_size > 0
        )


def _input_saved(t: LayerTraining, role: str) -> bool:
    """Whether the (shared) input of the linears in ``role`` is kept once for them."""
    return t.weight_trainable[role] or (t.lora_modules[role] > 0 and t.lora_dropout == 0)


def _lora_extra(t: LayerTraining, role: str, width: int, act_bytes: int, input_grad: bool) -> int:
    """Per-token bytes LoRA adds on the linears of ``role`` with input width ``width``."""
    n = t.lora_modules[role]
    if not n:
        return 0
    extra = n * t.lora_rank * act_bytes  # lora_B saves lora_A's output
    if t.lora_dropout > 0:
        extra += n * width * act_bytes  # each module's dropped-out input, saved by lora_A
        if input_grad:  # the mask is kept only when the gradient flows on through dropout
            extra += n * width * (t.dropout_mask_bytes or act_bytes)
    return extra


def attention_needs_grad(t: LayerTraining) -> bool:
    """Whether the gradient flows through the layer's attention (its q, k, v need gradients)."""
    return (
        t.grad_in
        or t.norm_trainable
        or t.weight_trainable["attn_in"]
        or t.lora_modules["attn_in"] > 0
        or t.bias_trainable["attn_in"]
    )


def layer_saved_bytes(
    shape: ModelShape, t: LayerTraining, seq: int, act_bytes: int, attn_implementation: str = "sdpa"
) -> int:
    """Bytes autograd keeps for one decoder layer and one sequence of ``seq`` tokens."""
    if not (t.grad_in or t.trains):
        return 0
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    a = act_bytes
    per_token = 0
    # input norm: fp32 copy of x (RMSNorm upcasts) when the gradient flows into x
    if t.grad_in:
        per_token += 4 * h
    if t.norm_trainable:
        per_token += a * h
    # a trained bias needs the gradient at its linear's output: a trained attn_in bias needs it through
    # the attention, an attn_out bias in the residual stream after it, an mlp_in bias through the MLP's
    # activation; an mlp_out bias is served by the layer's output gradient
    attn_in_grad = attention_needs_grad(t)
    if _input_saved(t, "attn_in"):
        per_token += a * h
    per_token += _lora_extra(t, "attn_in", h, a, t.grad_in or t.norm_trainable)
    scores = 0
    if attn_in_grad:
        if attn_implementation in MATERIALIZES_SCORES:
            repeated = q if shape.num_kv_heads != shape.num_heads else kv
            per_token += a * (q + 2 * repeated)
            probs_bytes = 4 + (a if a != 4 else 0)
            scores = shape.num_heads * seq * probs_bytes  # per token: one row per head
            if _input_saved(t, "attn_out"):
                per_token += a * q  # o_proj reads a contiguous copy of the output
        else:
            per_token += a * (2 * q + 2 * kv) + 4 * shape.num_heads
    elif _input_saved(t, "attn_out"):
        per_token += a * q
    per_token += _lora_extra(t, "attn_out", q, a, attn_in_grad)
    mid_grad = (
        attn_in_grad
        or t.weight_trainable["attn_out"]
        or t.lora_modules["attn_out"] > 0
        or t.bias_trainable["attn_out"]
        or (t.adapter_size > 0 and t.adapter_count > 1)
    )
    # post-attention norm
    if mid_grad:
        per_token += 4 * h
    if t.norm_trainable:
        per_token += a * h
    if _input_saved(t, "mlp_in"):
        per_token += a * h
    per_token += _lora_extra(t, "mlp_in", h, a, mid_grad or t.norm_trainable)
    mlp_grad = (
        mid_grad
        or t.norm_trainable
        or t.weight_trainable["mlp_in"]
        or t.lora_modules["mlp_in"] > 0
        or t.bias_trainable["mlp_in"]
    )
    if mlp_grad:
        per_token += a * (3 * i if shape.gated_mlp else i)
    if _input_saved(t, "mlp_out"):
        per_token += a * i
    per_token += _lora_extra(t, "mlp_out", i, a, mlp_grad)
    if t.adapter_size:  # float32 adapters keep a float32 copy of h and the bottleneck activation (relu's
        # output is also the up-projection's input; silu and gelu keep their input as well)
        per_token += t.adapter_count * 4 * (h + (2 if t.adapter_keeps_both else 1) * t.adapter_size)
    return seq * (per_token + scores)


def checkpointed_layer_bytes(shape: ModelShape, seq: int, act_bytes: int) -> int:
    """What a checkpointed layer keeps: its input hidden state."""
    return seq * shape.hidden_size * act_bytes


def head_saved_bytes(
    shape: ModelShape,
    seq: int,
    act_bytes: int,
    *,
    grad: bool,
    norm_trainable: bool,
    lm_head_trainable: bool,
    attention_grad: bool = True,
) -> int:
    """Final norm and lm_head input, per sequence (the loss buffers are counted as logits), and the
    rotary cos/sin when the gradient flows through some layer's attention."""
    if not grad:
        return 0
    h = shape.hidden_size
    per_token = 4 * h + (act_bytes * h if norm_trainable else 0) + (act_bytes * h if lm_head_trainable else 0)
    rope = 2 * shape.head_dim * act_bytes if attention_grad else 0  # cos and sin, shared by every layer
    return seq * (per_token + rope)


def training_logits_bytes(shape: ModelShape, seq: int, act_bytes: int) -> int:
    """Loss buffers at the start of backward, per sequence: the saved fp32 log-probabilities,
    their gradient and the gradient of the logits (all ``seq x vocab`` in fp32)."""
    return 3 * seq * shape.vocab_size * 4


def inference_layer_workspace(
    shape: ModelShape, seq: int, context: int, act_bytes: int, attn_implementation: str = "sdpa"
) -> int:
    """Widest point of one layer's forward without autograd, per sequence: the residual stream,
    and the larger of the attention block (q/k/v/output, plus the score and probability
    matrices for eager) and the MLP (gate, up and their product live together)."""
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    a = act_bytes
    residual = 2 * h * a
    attention = (2 * q + 2 * kv) * a
    if attn_implementation in MATERIALIZES_SCORES:
        attention += shape.num_heads * context * (2 * a + (4 if a != 4 else 0))
    mlp = (3 * i if shape.gated_mlp else 2 * i) * a
    return seq * (residual + max(attention, mlp))
