"""Rotate a float model's hidden states by orthogonal matrices before it is quantized (QuaRot).

``rotate_model`` changes the weights, never what the float model computes:

1. every pre-norm's weight is folded into the linears it feeds (``W <- W diag(g)``, the norm's weight set
   to 1), and the final norm's into the output head, which is untied from the input embeddings if tied;
2. the residual stream is rotated by one random Hadamard matrix ``Q`` (a seeded random orthogonal
   matrix when no Hadamard matrix of the hidden size is built): the embeddings become ``E Q``, the
   linears reading the stream ``W Q``, the ones writing it ``Q^T W`` (their biases ``b Q``). RMSNorm
   commutes with ``Q`` once its weight is 1;
3. each attention head's values are rotated by a Hadamard matrix of the head size (``v_proj``'s rows and
   ``o_proj``'s columns, folded);
4. with ``online=True`` (``rotation="hadamard"``), the input of each MLP down projection is rotated by a
   random Hadamard matrix at run time (the product of gate and up cannot absorb one): its weight becomes
   ``W diag(s) H^T`` and the `QuantLinear` replacing it applies `hadamard_transform` to its input. While
   the layer is still float a forward pre-hook does it.

Rotated weights have no outlier channels left (QuaRot, QuIP#), which is what int8 activations need; their
weight groups are also closer to Gaussian. The folded rotations change no module's shape or kind, so a
``rotation="hadamard-folded"`` model exports to every format; an online rotation exports nowhere
else (the engines do not run it).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ...constants import ROTATIONS
from ...families import Family, UnsupportedFamilyError, find_decoder_layers, output_embedding_name, require_family
from ..core.hadamard import (
    hadamard_matrix,
    hadamard_transform,
    has_hadamard,
    random_signs,
    rotate_input_columns,
    rotate_output_rows,
    rotation_matrix,
)
from ..modules.replace import untie_output_embedding

logger = logging.get_logger(__name__)


def residual_rotation(hidden: int, seed: int) -> torch.Tensor:
    """The residual stream's rotation ``Q`` (float64, orthogonal): a random Hadamard matrix of order ``hidden``
    when one is built here (`has_hadamard`), else a random orthogonal matrix (QR of a Gaussian), from ``seed``."""
    if has_hadamard(hidden):
        return rotation_matrix(hidden, random_signs(hidden, seed))
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _check_family(model: nn.Module) -> Family:
    family = require_family(model, "rotation folds the norms into the linears and")
    problems = []
    if family.norm != "rms":
        problems.append(f"its norms compute {family.norm!r} (only plain RMSNorm, w * x_hat, folds exactly)")
    if family.sandwich_norms:
        problems.append("it normalizes the attention and MLP outputs before the residual add (sandwich norms)")
    if family.experts is not None:
        problems.append("its mixture-of-experts tensors are not rotated here")
    if family.conv1d:
        problems.append("its Conv1D layers are not rotated here")
    if problems:
        raise UnsupportedFamilyError(
            f"quantization.rotation cannot rotate a {family.name!r} model exactly: {'; '.join(problems)}. "
            "Supported: pre-norm RMSNorm families (llama, mistral, qwen2, qwen3, phi3)"
        )
    return family


def _final_norm(model: nn.Module, layers_name: str) -> nn.Module:
    base = layers_name.rpartition(".")[0]
    name = f"{base}.norm" if base else "norm"
    try:
        norm = model.get_submodule(name)
    except AttributeError:
        raise UnsupportedFamilyError(f"rotation needs the final norm at {name!r}; this model has none") from None
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is not None:
        raise UnsupportedFamilyError(f"rotation needs a weight-only RMSNorm at {name!r}, found {type(norm).__name__}")
    return norm


@torch.no_grad()
def _fold_norm(norm: nn.Module, consumers: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in consumers:
        lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def _rotate_inputs(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ q.to(lin.weight.device)).to(lin.weight.dtype))


@torch.no_grad()
def _rotate_outputs(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_(rotate_output_rows(lin.weight, q))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ q.to(lin.bias.device)).to(lin.bias.dtype))


def _online_hook(signs: torch.Tensor):
    def hook(module, args):
        return (hadamard_transform(args[0], signs.to(args[0].device)),) + tuple(args[1:])

    return hook


@torch.no_grad()
def rotate_model(model: nn.Module, rotation: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rotate ``model`` (float, in place; see the module docstring). ``rotation`` is ``"hadamard"`` (with the
    online rotations of the MLP down projections) or ``"hadamard-folded"``. Returns the online rotations:
    full module name -> int8 signs ``s`` (the module computes ``hadamard_transform(x, s) @ W^T``; a forward
    pre-hook does it on the float module until a `QuantLinear` replaces it)."""
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation={rotation!r} is not allowed; allowed values: None, {', '.join(ROTATIONS)}")
    family = _check_family(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers_name, layers = find_decoder_layers(model)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    q = residual_rotation(hidden, seed)
    embed = model.get_input_embeddings()
    head_name = output_embedding_name(model)
    head = model.get_submodule(head_name) if head_name else None
    if head is not None and head.weight is embed.weight:
        head = untie_output_embedding(model, head_name, copy=True)
        logger.warning(
            f"rotation unties {head_name} from the input embeddings (tie_word_embeddings=False): the head keeps "
            "its own rotated copy of the matrix (quantize it too with modules_to_not_convert=[])"
        )
    if head is None:
        raise UnsupportedFamilyError(
            "rotation needs the model's output head (get_output_embeddings); this model has none"
        )
    final_norm = _final_norm(model, layers_name)
    online: dict[str, torch.Tensor] = {}
    embed.weight.copy_((embed.weight.double() @ q.to(embed.weight.device)).to(embed.weight.dtype))
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}."
        groups = family.groups_for(layer, model.config)
        for g in groups:
            producer = layer.get_submodule(g.producer)
            consumers = [layer.get_submodule(c) for c in g.consumers]
            if not isinstance(producer, nn.Linear):  # a norm feeding the stream's readers
                _fold_norm(producer, consumers)
                for lin in consumers:
                    _rotate_inputs(lin, q)
        for role in ("attn_out", "mlp_out"):
            for name in family.roles.get(role, ()):
                _rotate_outputs(layer.get_submodule(name), q)
        for g in groups:
            producer = layer.get_submodule(g.producer)
            if not isinstance(producer, nn.Linear) or g.part is not None:
                continue
            consumer = layer.get_submodule(g.consumers[0])
            if g.needs_one_value_head_per_query_head:  # v -> o: rotating each head's values is exact with GQA too
                if has_hadamard(head_dim) and producer.out_features % head_dim == 0:
                    # each head's values v -> v H: v_proj's rows H^T W, o_proj's columns W H
                    h = hadamard_matrix(head_dim)
                    bv = torch.block_diag(*[h] * (producer.out_features // head_dim))
                    bo = torch.block_diag(*[h] * (consumer.in_features // head_dim))
                    _rotate_outputs(producer, bv)
                    _rotate_inputs(consumer, bo)
            elif rotation == "hadamard" and has_hadamard(consumer.in_features):
                signs = random_signs(consumer.in_features, seed + 1 + i)
                consumer.weight.copy_(rotate_input_columns(consumer.weight, signs))
                consumer.register_forward_pre_hook(_online_hook(signs))
                online[prefix + g.consumers[0]] = signs
    _fold_norm(final_norm, [head])
    _rotate_inputs(head, q)
    return online


__all__ = ["ROTATIONS", "residual_rotation", "rotate_model"]
