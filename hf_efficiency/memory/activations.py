"""Activation memory of a decoder layer: what autograd saves for backward, and what a forward
pass holds at its widest point when nothing is saved (inference).

Pure functions of the model's `ModelShape` (dimensions plus the family's layer facts) and of which
parts are trainable. The rules follow how PyTorch autograd saves tensors, checked tensor by tensor
against ``measure.saved_activation_bytes`` on every described family (CPU kernels, peft 0.21):

* a linear layer (GPT-2's ``Conv1D`` too) saves its input only when its *weight* is trainable;
  LoRA's ``lora_A`` saves the same input, or its own float32 copy when peft's float32 adapters sit
  on a 16-bit model (with dropout: its dropped-out copy and the mask); ``lora_B`` saves the rank-r
  intermediate;
* norms: RMSNorm saves its fp32 input when the gradient flows into it, and the normalized tensor
  (input dtype) when its weight trains; Gemma's ``(1 + w)`` norm keeps the normalized tensor in
  fp32; LayerNorm saves its input and fp32 mean/rstd. RMSNorm's rstd (4 bytes a row) is not
  counted. Gemma adds a norm after attention and after the MLP; Qwen3 and Gemma 3 normalize q and
  k per head;
* the MLP saves what its activation saves (SiLU/GELU: the input; ReLU: its output, which is also
  the down projection's input; GPT-2's ``gelu_new`` formula: four tensors); a gated MLP also saves
  the activation's output and ``up`` (3 x intermediate for SiLU); the product is saved when
  ``down_proj`` saves its input;
* ``sdpa``/flash attention save q, k, v (the KV cache's concatenated copies), the output (also
  o_proj's input, except after Phi-3's concatenating rotary embedding, which leaves it heads-major)
  and a per-head fp32 log-sum-exp; GPT-2's q is a view of the fused ``c_attn`` output, which is
  saved whole. Where a sliding window is shorter than the sequence, sdpa gets a mask, which it
  saves converted to the compute dtype (seq x seq), and k, v repeated to every head. ``eager`` saves q, the key/value repeated to every head and the probabilities
  (heads x seq x seq in fp32, plus a copy in a 16-bit compute dtype; GPT-2's softmax runs in the
  compute dtype; Gemma 2's logit soft-capping adds its tanh output);
* a mixture-of-experts block saves the router's fp32 probabilities and top-k indices, and per
  routed token (tokens x top_k) what a gated MLP saves, the gathered row (when the experts train),
  the expert output and its routing weight, and int64 gather/scatter orders; Qwen2-MoE's shared
  expert is a gated MLP whose output its sigmoid gate saves. LoRA on the fused experts and the
  router (peft's ``ParamWrapper``) merges ``W + B @ A`` for each forward; those merged weights are
  saved once per forward (`layer_forward_bytes`);
* Gemma's embedding scaling and Gemma 2's final-logit soft-capping: the scaling saves a scalar only;
  the soft-capping saves its tanh output (tokens x vocabulary, `head_saved_bytes`);
* with gradient checkpointing each layer keeps only its input, and one layer is recomputed
  at a time during backward.

Except for `layer_forward_bytes`, everything is bytes per *one sequence*; the caller multiplies by
the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .shapes import ModelShape

ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
#: the parts of a mixture-of-experts block: router, fused experts (gate_up, down), shared expert and its gate
MOE_ROLES = ("router", "expert_in", "expert_out", "shared_in", "shared_out", "shared_gate")
LAYER_ROLES = ROLES + MOE_ROLES
ATTENTION_IMPLEMENTATIONS = (
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
    "hf_efficiency_flash",
)
MATERIALIZES_SCORES = ("eager",)
#: int64 indices (top-k choice, token gather and scatter orders) of a mixture-of-experts block
INDEX_BYTES = 8


@dataclass
class LayerTraining:
    """Which parts of one decoder layer train, as the activation rules need them."""

    grad_in: bool = False  # the layer's input needs a gradient (something below trains)
    norm_trainable: bool = False  # the layer's norm weights (input, post-attention, q/k, sandwich)
    weight_trainable: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(LAYER_ROLES, False))
    lora_modules: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LAYER_ROLES, 0))
    lora_rank: int = 0
    lora_dropout: float = 0.0
    lora_bytes: int = 0  # bytes per element of the adapters' computation (peft: float32); 0: the compute dtype
    dropout_mask_bytes: int = 1  # bool mask of CUDA's fused dropout; 0: a mask in the dropout's dtype (CPU)
    adapter_size: int = 0
    adapter_count: int = 1  # 2 for Houlsby placement (after attention and after the MLP)
    adapter_keeps_both: bool = False  # the nonlinearity saves its input (silu, gelu) besides relu's output
    bias_trainable: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(LAYER_ROLES, False))  # BitFit
    #: bytes of weights peft materializes as ``W + B @ A`` for a forward (LoRA on fused expert parameters and the
    #: router, peft's ``ParamWrapper``); autograd keeps them once per forward, whatever the batch
    merged_weight_bytes: int = 0

    @property
    def trains(self) -> bool:
        return (
            self.norm_trainable
            or any(self.bias_trainable.values())
            or any(self.weight_trainable.values())
            or any(self.lora_modules.values())
            or self.adapter_size > 0
        )

    def changes(self, role: str) -> bool:
        """Whether the output of the linears in ``role`` depends on trained parameters."""
        return self.weight_trainable[role] or self.lora_modules[role] > 0 or self.bias_trainable[role]


def _input_saved(t: LayerTraining, role: str, a: int) -> bool:
    """Whether the (shared) input of the linears in ``role`` is kept once for them."""
    lora_shares = t.lora_modules[role] > 0 and t.lora_dropout == 0 and (t.lora_bytes or a) == a
    return t.weight_trainable[role] or lora_shares


def _lora_extra(t: LayerTraining, role: str, width: int, act_bytes: int, input_grad: bool) -> int:
    """Per-token bytes LoRA adds on the linears of ``role`` with input width ``width``."""
    n = t.lora_modules[role]
    if not n:
        return 0
    b = t.lora_bytes or act_bytes
    extra = n * t.lora_rank * b  # lora_B saves lora_A's output
    if t.lora_dropout > 0:
        extra += n * width * b  # each module's dropped-out input, saved by lora_A
        if input_grad:  # the mask is kept only when the gradient flows on through dropout
            extra += n * width * (t.dropout_mask_bytes or b)
    elif b != act_bytes:
        extra += n * width * b  # each module casts its input to the adapters' dtype; lora_A saves that copy
    return extra


def attention_needs_grad(t: LayerTraining) -> bool:
    """Whether the gradient flows through the layer's attention (its q, k, v need gradients)."""
    return t.grad_in or t.norm_trainable or t.changes("attn_in")


def _norm_bytes(shape: ModelShape, width: int, a: int, *, grad: bool, trainable: bool) -> int:
    """Per-token bytes one norm over ``width`` channels saves (``grad``: the gradient flows into its input)."""
    if shape.norm == "layer":  # the input, and fp32 mean and rstd per row
        return a * width + 8 if grad or trainable else 0
    out = 4 * width if grad else 0  # the fp32 input
    if trainable:  # the normalized tensor, for the weight's gradient
        out += (4 if shape.norm == "rms_one_plus" else a) * width
    return out


def _attention_bytes(
    shape: ModelShape,
    t: LayerTraining,
    seq: int,
    a: int,
    attn_implementation: str,
    batch: int | None,
    grad: bool,
    layer: int,
) -> int:
    """Per-token bytes of the attention between the q/k/v projections and o_proj, o_proj's input included."""
    q, kv, heads = shape.q_dim, shape.kv_dim, shape.num_heads
    o_saved = _input_saved(t, "attn_out", a)
    if not grad:
        return a * q if o_saved else 0
    fused_view = shape.fused_qkv and not shape.rope  # q (and k, v) are views of one projection's output
    if attn_implementation in MATERIALIZES_SCORES:
        # matmul copies q to (batch * heads, seq, head_dim); at batch 1 a view suffices and keeps GPT-2's
        # whole fused output
        query = a * (q + 2 * kv) if fused_view and batch == 1 else a * q
        repeated = q if shape.num_kv_heads != shape.num_heads else kv
        probs_bytes = (4 + (a if a != 4 else 0)) if shape.eager_softmax_fp32 else a
        scores = heads * seq * (probs_bytes + (a if shape.attn_softcap else 0))  # one row per head
        return query + 2 * a * repeated + scores + (a * q if o_saved else 0)  # o_proj reads a contiguous copy
    if fused_view:
        query = a * (q + 2 * kv)
        keys_values = 2 * a * kv if shape.use_cache else 0
    elif shape.fused_qkv and not shape.use_cache:  # v stays a view of the fused output
        query, keys_values = a * q, a * kv + a * (q + 2 * kv)
    elif attn_implementation == "sdpa" and shape.sdpa_mask(layer, seq):
        # with an explicit mask transformers repeats k and v to every head instead of sdpa's grouped-query path,
        # and sdpa saves the mask converted to the compute dtype (one row of seq per token)
        query, keys_values = a * q, 2 * a * (q if shape.num_kv_heads != shape.num_heads else kv) + seq * a
    else:
        query, keys_values = a * q, 2 * a * kv
    output = a * q  # also o_proj's input, unless the heads-major output is copied for it
    copy = a * q if shape.rope_concat and o_saved else 0
    return query + keys_values + output + copy + 4 * heads


def _mlp_bytes(shape: ModelShape, t: LayerTraining, a: int, grad: bool) -> int:
    """Per-token bytes of a dense MLP between its input projections and the down projection's input."""
    i = shape.intermediate_size
    saved_out = _input_saved(t, "mlp_out", a)
    return _mlp_inner(shape, i, a, grad=grad, gated=shape.gated_mlp, fused=shape.fused_gate_up, down_saved=saved_out)


def _mlp_inner(shape: ModelShape, i: int, a: int, *, grad: bool, gated: bool, fused: bool, down_saved: bool) -> int:
    """Per-token bytes of an MLP of width ``i`` after its input projections: what the activation (and, gated,
    the product with ``up``) saves when ``grad`` flows through it, and the down projection's input."""
    act = int(shape.act_saves_input) + shape.act_saves_other
    out = 0
    if gated:
        if grad:  # gate (or the fused gate_up output), the activation's own tensors, its output and up
            out += a * i * (3 + shape.act_saves_other if fused else act + 2)
        if down_saved:
            out += a * i  # the product
    else:
        if grad:
            out += a * i * (act + int(shape.act_saves_output))
        if down_saved and not (grad and shape.act_saves_output):  # ReLU's saved output is that input
            out += a * i
    return out


def _moe_bytes(shape: ModelShape, t: LayerTraining, a: int, grad: bool) -> int:
    """Per-token bytes of a mixture-of-experts block (router, routed experts, shared expert) from its input on.
    ``grad``: the gradient flows into the block's input."""
    h, k, e, i = shape.hidden_size, shape.top_k, shape.num_experts, shape.expert_intermediate_size
    w = t.weight_trainable
    out = a * h if any(_input_saved(t, r, a) for r in ("router", "shared_in", "shared_gate")) else 0
    router_grad = grad or w["router"]
    experts_grad = grad or w["expert_in"] or w["expert_out"]
    if router_grad:
        out += 4 * e + INDEX_BYTES * k  # fp32 probabilities, top-k indices
        if shape.norm_topk_prob:
            out += 4 * k + 4  # the top-k probabilities and their sum
        out += INDEX_BYTES * k  # the routing weights gathered in expert order
        if experts_grad:
            out += k * a * h  # expert outputs, saved by the routing-weight product
    if experts_grad:
        out += k * (4 if shape.router_weights_fp32 else a)  # routing weights, saved by the same product
    if router_grad or experts_grad:
        out += INDEX_BYTES * k  # scatter back to token order
    if grad:
        out += INDEX_BYTES * k  # token rows gathered in expert order
    if w["expert_in"]:
        out += k * a * h  # the gathered rows, input of the gate_up grouped matmul
    out += k * _mlp_inner(shape, i, a, grad=experts_grad, gated=True, fused=True, down_saved=w["expert_out"])
    si = shape.shared_expert_intermediate_size
    if si:
        shared_grad = grad or t.changes("shared_in")
        out += _lora_extra(t, "shared_in", h, a, grad)
        out += _mlp_inner(
            shape, si, a, grad=shared_grad, gated=True, fused=False, down_saved=_input_saved(t, "shared_out", a)
        )
        out += _lora_extra(t, "shared_out", si, a, shared_grad)
        if shape.shared_expert_gate:
            gate_grad = grad or t.changes("shared_gate")
            out += _lora_extra(t, "shared_gate", h, a, grad)
            if gate_grad:
                out += a * h  # the shared expert's output, saved by the gate product
            if gate_grad or shared_grad or t.changes("shared_out"):
                out += a  # the sigmoid's output
    return out


def layer_saved_bytes(
    shape: ModelShape,
    t: LayerTraining,
    seq: int,
    act_bytes: int,
    attn_implementation: str = "sdpa",
    *,
    layer: int = 0,
    batch: int | None = None,
) -> int:
    """Bytes autograd keeps for decoder layer ``layer`` and one sequence of ``seq`` tokens (``batch``: the
    batch size, where a view instead of a copy is saved at batch 1)."""
    if not (t.grad_in or t.trains):
        return 0
    h, q = shape.hidden_size, shape.q_dim
    a = act_bytes
    norm = t.norm_trainable
    # input norm, then the q/k/v projections' shared input
    per_token = _norm_bytes(shape, h, a, grad=t.grad_in, trainable=norm)
    # a trained bias needs the gradient at its linear's output: a trained attn_in bias needs it through
    # the attention, an attn_out bias in the residual stream after it, an mlp_in bias through the MLP's
    # activation; an mlp_out bias is served by the layer's output gradient
    attn_grad = attention_needs_grad(t)
    if _input_saved(t, "attn_in", a):
        per_token += a * h
    per_token += _lora_extra(t, "attn_in", h, a, t.grad_in or norm)
    if shape.qk_norm:
        per_token += _norm_bytes(shape, q + shape.kv_dim, a, grad=attn_grad, trainable=norm)
    per_token += _attention_bytes(shape, t, seq, a, attn_implementation, batch, attn_grad, layer)
    per_token += _lora_extra(t, "attn_out", q, a, attn_grad)
    houlsby = t.adapter_size > 0 and t.adapter_count > 1  # an adapter on the attention output
    attn_out_grad = attn_grad or t.changes("attn_out") or houlsby
    if shape.sandwich_norms:  # Gemma: norm of the attention output before the residual add
        per_token += _norm_bytes(shape, h, a, grad=attn_out_grad, trainable=norm)
    mid_grad = attn_out_grad
    # post-attention (pre-MLP) norm
    per_token += _norm_bytes(shape, h, a, grad=mid_grad, trainable=norm)
    if shape.is_sparse(layer):
        per_token += _moe_bytes(shape, t, a, mid_grad or norm)
        mlp_out_grad = mid_grad or norm or any(t.changes(r) for r in MOE_ROLES) or t.adapter_size > 0
    else:
        if _input_saved(t, "mlp_in", a):
            per_token += a * h
        per_token += _lora_extra(t, "mlp_in", h, a, mid_grad or norm)
        mlp_grad = mid_grad or norm or t.changes("mlp_in")
        per_token += _mlp_bytes(shape, t, a, mlp_grad)
        per_token += _lora_extra(t, "mlp_out", shape.intermediate_size, a, mlp_grad)
        mlp_out_grad = mlp_grad or t.changes("mlp_out") or t.adapter_size > 0  # adapters follow the MLP
    if shape.sandwich_norms:  # Gemma: norm of the MLP output before the residual add
        per_token += _norm_bytes(shape, h, a, grad=mlp_out_grad, trainable=norm)
    if t.adapter_size:  # float32 adapters keep a float32 copy of h and the bottleneck activation (relu's
        # output is also the up-projection's input; silu and gelu keep their input as well)
        per_token += t.adapter_count * 4 * (h + (2 if t.adapter_keeps_both else 1) * t.adapter_size)
    return seq * per_token


def layer_forward_bytes(t: LayerTraining) -> int:
    """Bytes a layer keeps once per forward rather than per sequence: weights peft merged with their LoRA
    update (``W + B @ A`` of the fused experts and the router), which the matmuls save for the input gradient."""
    return t.merged_weight_bytes


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
    rope_tables: int | None = None,
) -> int:
    """Final norm and lm_head input, per sequence (the loss buffers are counted as logits), Gemma 2's
    soft-capped logits (tanh output), and the rotary cos/sin (one pair per rotary table, counted per
    sequence) when the gradient flows through some layer's attention (``rope_tables``: how many
    tables those layers read; default: all of them)."""
    if not grad:
        return 0
    h, a = shape.hidden_size, act_bytes
    per_token = _norm_bytes(shape, h, a, grad=True, trainable=norm_trainable)
    per_token += (a * h if lm_head_trainable else 0) + (a * shape.vocab_size if shape.final_softcap else 0)
    if rope_tables is None:
        rope_tables = shape.rope_sets if attention_grad and shape.rope else 0
    rope = 2 * shape.head_dim * a * rope_tables
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
    matrices for eager, or sdpa's sliding-window mask) and the MLP (gate, up and their product live together), over the model's
    layers. A mixture-of-experts layer holds, per routed token (tokens x top_k), the gathered row
    and then either the gate_up output with the activation and product, or the expert output with
    its weighted and reordered copies; plus the fp32 router probabilities and, for Qwen2-MoE, the
    shared expert's output."""
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    a = act_bytes
    residual = 2 * h * a
    attention = (2 * q + 2 * kv) * a
    if attn_implementation in MATERIALIZES_SCORES:
        attention += shape.num_heads * context * (2 * a + (4 if a != 4 else 0))
    elif attn_implementation == "sdpa" and any(shape.sdpa_mask(k, seq) for k in shape.sliding_layers):
        attention += context * (1 + a)  # the boolean sliding-window mask and sdpa's converted copy
    mlp = (3 * i if shape.gated_mlp else 2 * i) * a
    if shape.sparse_layers:
        k, ei, si = shape.top_k, shape.expert_intermediate_size, shape.shared_expert_intermediate_size
        experts = k * a * (h + max(4 * ei, 3 * h)) + 4 * shape.num_experts + 3 * 8 * k
        moe = max(3 * si * a, experts + (h * a if si else 0))
        mlp = moe if len(shape.sparse_layers) == shape.num_layers else max(mlp, moe)
    return seq * (residual + max(attention, mlp))
