"""An ensemble of causal LMs (training snapshots or different students) that behaves like one causal LM.

:class:`StudentEnsemble` is a :class:`~transformers.PreTrainedModel` with
:class:`~transformers.GenerationMixin`: ``forward`` returns a ``CausalLMOutputWithPast`` (with a loss
when ``labels`` are given) and ``generate`` works with every decoding strategy that only needs a
reorderable dynamic cache (greedy, sampling, beam search, ``num_return_sequences``). Every member is
run on the same inputs; their logits are cut to the common vocabulary and combined with the weights
``w`` (non-negative, summing to 1):

* ``combine="probs"`` (default): ``log(sum_k w_k softmax(logits_k))``, so ``softmax(output)`` is the
  weighted mixture of the members' next-token distributions;
* ``combine="logits"``: ``sum_k w_k logits_k``;
* ``combine="log_probs"``: ``sum_k w_k log_softmax(logits_k)`` (a normalized product of experts up
  to the softmax).

KV caching: each member keeps its own cache inside an :class:`EnsembleCache` (one
``DynamicCache`` per member). ``generate`` creates it through ``_prepare_cache_for_generation``;
``forward`` hands ``cache.caches[k]`` to member ``k``.

The ensemble is meant for inference: members are put in eval mode with ``requires_grad_(False)``.
``save_pretrained`` writes the ensemble ``config.json`` and every member as an ordinary model
folder under ``members/{k}`` (each loadable alone with ``AutoModelForCausalLM``).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

logger = logging.get_logger(__name__)

COMBINE_MODES = ("probs", "logits", "log_probs")
MEMBERS_DIR = "members"
# from_pretrained kwargs that address the Hub copy of the ensemble, not the (local) member folders
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


class StudentEnsembleConfig(PreTrainedConfig):
    """Configuration of a :class:`StudentEnsemble`.

    Fields: ``member_configs`` (each member's ``config.to_dict()``), ``weights`` (one non-negative
    float per member summing to 1, or None for uniform), ``combine`` (``"probs"``, ``"logits"`` or
    ``"log_probs"``) and ``vocab_size`` (the smallest member vocabulary; derived when None).
    """

    model_type = "hf_efficiency_student_ensemble"

    member_configs: list[dict] | None = None
    weights: list[float] | None = None
    combine: str = "probs"
    vocab_size: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.vocab_size is None and self.member_configs:
            sizes = [_config_vocab_size(c) for c in self.member_configs]
            if all(s is not None for s in sizes):
                self.vocab_size = min(sizes)
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if self.member_configs is not None and len(self.weights) != len(self.member_configs):
                raise ValueError(f"{len(self.weights)} weights for {len(self.member_configs)} members")
        super().__post_init__(**kwargs)

    @property
    def num_members(self) -> int:
        """Number of ensemble members."""
        return len(self.member_configs or [])


def _config_vocab_size(config: dict[str, Any]) -> int | None:
    if config.get("vocab_size") is not None:
        return int(config["vocab_size"])
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("vocab_size") is not None:
        return int(text["vocab_size"])
    return None


def _model_vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config(decoder=True).vocab_size)


def normalize_weights(weights: Sequence[float] | None, num_members: int) -> list[float]:
    """Explicit weights normalized to sum 1 (None = uniform); ValueError on a bad length or value."""
    if num_members < 1:
        raise ValueError("an ensemble needs at least one member")
    if weights is None:
        return [1.0 / num_members] * num_members
    values = [float(w) for w in weights]
    if len(values) != num_members:
        raise ValueError(f"got {len(values)} weights for {num_members} members")
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {values}")
    return [w / total for w in values]


class EnsembleCache(Cache):
    """One cache per ensemble member; ``caches[k]`` is handed to member ``k``.

    Length queries (``get_seq_length`` ...) read member 0; state changes (``reorder_cache``,
    ``crop``, ``reset``, batch repeat / select) are applied to every member's cache, so beam search
    and ``num_return_sequences`` work.
    """

    def __init__(self, caches: Sequence[Cache]) -> None:
        # Cache.__init__ wants per-layer objects; the layers live in the member caches instead.
        if not caches:
            raise ValueError("EnsembleCache needs at least one member cache")
        for cache in caches:
            if not isinstance(cache, Cache):
                raise TypeError(f"EnsembleCache members must be Cache instances, got {type(cache).__name__}")
        self.caches: list[Cache] = list(caches)
        self.offloading = False

    @classmethod
    def for_models(cls, models: Sequence[nn.Module], offloading: bool = False) -> EnsembleCache:
        """Fresh dynamic caches shaped after each model's config (sliding-window layers included)."""
        return cls([DynamicCache(config=m.config, offloading=offloading) for m in models])

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(caches={self.caches})"

    def __len__(self) -> int:
        return len(self.caches[0])

    def __getitem__(self, index: int) -> Cache:
        return self.caches[index]

    def __iter__(self) -> Iterator[Cache]:
        return iter(self.caches)

    @property
    def layers(self) -> list[Any]:
        """Member 0's layers (what generic code inspecting ``cache.layers`` sees)."""
        return self.caches[0].layers

    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("EnsembleCache is not updated directly; each member updates its own cache")

    def early_initialization(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("EnsembleCache holds dynamic member caches only")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.caches[0].get_max_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.caches[0].get_mask_sizes(query_length, layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_query_offset(layer_idx)

    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self.caches:
            cache.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        for cache in self.caches:
            cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self.caches:
            cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in self.caches:
            cache.batch_select_indices(indices)

    def activate_past_recording(self) -> None:
        for cache in self.caches:
            cache.activate_past_recording()

    def is_recording_past(self, layer_idx: int) -> bool:
        return self.caches[0].is_recording_past(layer_idx)

    @property
    def batch_size(self) -> int:
        return self.caches[0].batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return all(cache.is_initialized for cache in self.caches)

    @property
    def is_croppable(self) -> bool:
        return all(cache.is_croppable for cache in self.caches)

    @property
    def is_sliding(self) -> list[bool]:
        return self.caches[0].is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self.caches[0].is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self.caches[0].is_dummy


class StudentEnsemble(PreTrainedModel, GenerationMixin):
    """Weighted ensemble of causal LMs sharing a tokenizer; use it like a causal LM (inference only).

    Build it with :meth:`from_models`, :meth:`from_snapshots` or :meth:`from_pretrained`;
    ``StudentEnsemble(config)`` alone creates randomly initialized members from
    ``config.member_configs``. See the module docstring for the combination rules and caching.
    """

    config_class = StudentEnsembleConfig
    config: StudentEnsembleConfig
    main_input_name = "input_ids"
    base_model_prefix = ""
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: StudentEnsembleConfig, models: Sequence[PreTrainedModel] | None = None) -> None:
        super().__init__(config)
        if models is None:
            if not config.member_configs:
                raise ValueError("StudentEnsembleConfig.member_configs is empty and no models were given")
            models = [AutoModelForCausalLM.from_config(_member_config(c)) for c in config.member_configs]
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one member")
        if config.member_configs is not None and len(config.member_configs) != len(models):
            raise ValueError(f"config lists {len(config.member_configs)} members, got {len(models)} models")
        self.members = nn.ModuleList(models)
        for member in self.members:
            member.eval()
            member.requires_grad_(False)
        config.member_configs = [m.config.to_dict() for m in self.members]
        config.vocab_size = min(_model_vocab_size(m) for m in self.members)
        config.weights = normalize_weights(config.weights, len(models))
        first = self.members[0]
        if getattr(first, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(first.generation_config)
            self.generation_config.cache_implementation = None  # see _prepare_cache_for_generation
        self.post_init()
        self.eval()

    def init_weights(self) -> None:
        """No-op: the members come initialized (or loaded) and the ensemble has no weights of its own."""

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_models(
        cls, models: Sequence[PreTrainedModel], weights: Sequence[float] | None = None, combine: str = "probs"
    ) -> StudentEnsemble:
        """Ensemble of already loaded causal LMs (weights: None = uniform, else normalized to sum 1).

        The models are used as they are (not copied): they are switched to eval mode and frozen.
        """
        models = list(models)
        if not models:
            raise ValueError("an ensemble needs at least one member")
        for model in models:
            if not isinstance(model, PreTrainedModel):
                raise TypeError(
                    f"members must be transformers PreTrainedModels (merge peft adapters first), "
                    f"got {type(model).__name__}"
                )
        config = StudentEnsembleConfig(
            member_configs=[m.config.to_dict() for m in models],
            weights=normalize_weights(weights, len(models)),
            combine=combine,
        )
        return cls(config, models=models)

    @classmethod
    def from_snapshots(
        cls,
        folder: str | os.PathLike,
        last: int | None = None,
        weights: str | Sequence[float] | None = None,
        combine: str = "probs",
        **from_pretrained_kwargs: Any,
    ) -> StudentEnsemble:
        """Ensemble of the snapshots indexed in ``folder/snapshots.json`` (the ``last`` newest ones).

        ``weights``: None / ``"uniform"``; ``"linear"`` (proportional to 1..n, later snapshots weigh
        more); ``"eval_loss"`` (softmax of ``-eval_loss``; every snapshot needs one); or a list (normalized).
        Each snapshot is loaded with ``AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)``.
        """
        from .snapshots import list_snapshots  # keeps this module free of Trainer imports

        entries = list_snapshots(folder)
        if last is not None:
            if isinstance(last, bool) or not isinstance(last, int) or last < 1:
                raise ValueError(f"last must be a positive int, got {last!r}")
            entries = entries[-last:]
        if not entries:
            raise ValueError(f"no snapshots listed in {folder!r}")
        n = len(entries)
        if weights is None or (isinstance(weights, str) and weights == "uniform"):
            resolved = normalize_weights(None, n)
        elif isinstance(weights, str) and weights == "linear":
            resolved = normalize_weights([float(i + 1) for i in range(n)], n)
        elif isinstance(weights, str) and weights == "eval_loss":
            missing = [e["path"] for e in entries if e.get("eval_loss") is None]
            if missing:
                raise ValueError(f"weights='eval_loss' needs an eval_loss for every snapshot; missing for {missing}")
            losses = torch.tensor([float(e["eval_loss"]) for e in entries], dtype=torch.float64)
            resolved = torch.softmax(-losses, dim=0).tolist()
        elif isinstance(weights, str):
            raise ValueError(f"unknown weights {weights!r}; expected 'uniform', 'linear', 'eval_loss' or a list")
        else:
            resolved = normalize_weights(weights, n)
        models = [
            AutoModelForCausalLM.from_pretrained(os.path.join(folder, e["path"]), **from_pretrained_kwargs)
            for e in entries
        ]
        logger.info("Loaded a %d-snapshot ensemble from %s (weights %s)", n, folder, resolved)
        return cls.from_models(models, weights=resolved, combine=combine)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: StudentEnsembleConfig | None = None,
        **kwargs: Any,
    ) -> StudentEnsemble:
        """Load an ensemble saved by :meth:`save_pretrained` (a local folder or a Hub repo id).

        Remaining ``kwargs`` (``dtype``, ``device_map``, ``attn_implementation`` ...) are passed to
        ``AutoModelForCausalLM.from_pretrained`` for every member.
        """
        if model_args:
            raise TypeError("StudentEnsemble.from_pretrained takes no positional model arguments")
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        for internal in ("_from_auto", "_from_pipeline"):  # set by the Auto class (transformers >= 5.25)
            kwargs.pop(internal, None)
        folder = str(pretrained_model_name_or_path)
        subfolder = hub_kwargs.pop("subfolder", None) or ""
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            allowed = {
                k: v
                for k, v in hub_kwargs.items()
                if k in ("cache_dir", "force_download", "local_files_only", "revision", "token")
            }
            folder = snapshot_download(repo_id=folder, **allowed)
        folder = os.path.join(folder, subfolder) if subfolder else folder
        if config is None:
            config = StudentEnsembleConfig.from_pretrained(folder)
        if not config.member_configs:
            raise ValueError(f"{folder} holds no ensemble members (member_configs is empty)")
        models = []
        for k in range(config.num_members):
            member_dir = os.path.join(folder, MEMBERS_DIR, str(k))
            if not os.path.isdir(member_dir):
                raise FileNotFoundError(f"missing ensemble member folder {member_dir}")
            models.append(AutoModelForCausalLM.from_pretrained(member_dir, **kwargs))
        ensemble = cls(config, models=models)
        if os.path.isfile(os.path.join(folder, "generation_config.json")):
            ensemble.generation_config = GenerationConfig.from_pretrained(folder)
        ensemble.name_or_path = str(pretrained_model_name_or_path)
        return ensemble

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """Write ``config.json`` (+ ``generation_config.json``) and each member under ``members/{k}``."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, not a folder")
        repo_id = kwargs.pop("repo_id", None)
        commit_message = kwargs.pop("commit_message", None)
        token = kwargs.pop("token", None)
        private = kwargs.pop("private", None)
        os.makedirs(save_directory, exist_ok=True)
        self.config.member_configs = [m.config.to_dict() for m in self.members]
        if is_main_process:
            self.config.architectures = [type(self).__name__]
            self.config.save_pretrained(save_directory)
            if getattr(self, "generation_config", None) is not None:
                self.generation_config.save_pretrained(save_directory)
        for k, member in enumerate(self.members):
            member.save_pretrained(
                os.path.join(save_directory, MEMBERS_DIR, str(k)), is_main_process=is_main_process, **kwargs
            )
        if push_to_hub and is_main_process:
            self._upload_folder(
                str(save_directory),
                repo_id or os.path.basename(os.path.abspath(save_directory)),
                commit_message=commit_message,
                token=token,
                private=private,
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save to a temporary folder and upload it (members included) with ``HfApi.upload_folder``."""
        save_kwargs.pop("tags", None)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, **save_kwargs)
            return self._upload_folder(
                tmp,
                repo_id,
                commit_message=commit_message,
                token=token,
                private=private,
                revision=revision,
                create_pr=create_pr,
                commit_description=commit_description,
            )

    @staticmethod
    def _upload_folder(
        folder: str,
        repo_id: str,
        commit_message: str | None = None,
        token: Any = None,
        private: bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_description: str | None = None,
    ) -> Any:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload StudentEnsemble",
            commit_description=commit_description,
        )

    # -- weights -----------------------------------------------------------------------------------

    @property
    def weights(self) -> list[float]:
        """The member weights (non-negative, summing to 1)."""
        return list(self.config.weights)

    def set_weights(self, weights: Sequence[float] | None) -> list[float]:
        """Set (normalized) member weights on the ensemble and its config; None = uniform."""
        self.config.weights = normalize_weights(weights, len(self.members))
        return self.weights

    @property
    def combine(self) -> str:
        """How member outputs are combined: ``"probs"``, ``"logits"`` or ``"log_probs"``."""
        return self.config.combine

    def get_input_embeddings(self) -> nn.Module:
        """Member 0's input embeddings (members may differ; for shape/device queries only)."""
        return self.members[0].get_input_embeddings()

    def combine_logits(self, member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Combine per-member logits ``[..., V_k]`` into ensemble logits ``[..., V]`` (float32)."""
        vocab = self.config.vocab_size
        device = member_logits[0].device
        # zero-weight members are left out (0 * -inf would give NaN for masked vocabulary entries)
        keep = [k for k, w in enumerate(self.config.weights) if w > 0]
        logits = torch.stack([member_logits[k][..., :vocab].to(device=device, dtype=torch.float32) for k in keep])
        w = torch.tensor([self.config.weights[k] for k in keep], dtype=torch.float32, device=device)
        w = w.view(-1, *([1] * (logits.dim() - 1)))
        if self.config.combine == "logits":
            return (w * logits).sum(0)
        log_probs = torch.log_softmax(logits, dim=-1)
        if self.config.combine == "log_probs":
            return (w * log_probs).sum(0)
        return torch.logsumexp(torch.log(w) + log_probs, dim=0)

    # -- forward / generate ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: EnsembleCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: EnsembleCache | None = None,
        cache_position: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Run every member on the same inputs and combine their logits (see the module docstring).

        ``past_key_values`` is an alias of ``cache`` (an :class:`EnsembleCache`); ``cache_position`` is
        accepted and ignored (transformers v5 models derive positions from the cache). With ``labels``
        the loss is the usual shifted causal-LM cross-entropy on the combined logits (ignoring -100,
        summed over ``num_items_in_batch`` when given).
        """
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass the ensemble cache as `cache` or `past_key_values`, not both")
            cache = past_key_values
        if inputs_embeds is not None:
            raise ValueError("StudentEnsemble takes input_ids only: its members have different embeddings")
        if input_ids is None:
            raise ValueError("input_ids is required")
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        return_dict = kwargs.pop("return_dict", True)
        for unsupported in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(unsupported, False):
                logger.warning_once(f"StudentEnsemble ignores {unsupported}=True (members differ in shape)")

        if cache is None:
            member_caches: list[Cache | None] = [None] * len(self.members)
        elif isinstance(cache, EnsembleCache):
            if len(cache.caches) != len(self.members):
                raise ValueError(f"EnsembleCache has {len(cache.caches)} caches for {len(self.members)} members")
            member_caches = list(cache.caches)
        else:
            raise TypeError(f"StudentEnsemble needs an EnsembleCache, got {type(cache).__name__}")

        outputs = []
        for member, member_cache in zip(self.members, member_caches):
            member_kwargs = dict(kwargs)
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                member_kwargs["logits_to_keep"] = logits_to_keep
            outputs.append(
                member(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=member_cache,
                    use_cache=use_cache,
                    return_dict=True,
                    **member_kwargs,
                )
            )
        logits = self.combine_logits([out.logits for out in outputs])

        if cache is None and all(getattr(out, "cache", None) is not None for out in outputs):
            cache = EnsembleCache([out.cache for out in outputs])
        elif cache is not None:
            cache.caches = [
                out.cache if getattr(out, "cache", None) is not None else c for out, c in zip(outputs, cache.caches)
            ]

        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Put a fresh :class:`EnsembleCache` (one ``DynamicCache`` per member) in ``model_kwargs``."""
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            if not isinstance(user_cache, EnsembleCache):
                raise TypeError(f"StudentEnsemble.generate needs an EnsembleCache, got {type(user_cache).__name__}")
            if generation_config.cache_implementation is not None:
                raise ValueError("pass either `cache_implementation` or `cache`, not both")
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "offloaded"):
            raise NotImplementedError(
                f"StudentEnsemble supports dynamic caches only, not cache_implementation={implementation!r}"
            )
        cache = EnsembleCache.for_models(self.members, offloading=implementation == "offloaded")
        if generation_config.is_assistant:
            cache.activate_past_recording()
        model_kwargs["cache"] = cache

    # -- weight fitting ----------------------------------------------------------------------------

    @torch.no_grad()
    def member_token_log_probs(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, batch_size: int = 4
    ) -> torch.Tensor:
        """``[K, M]`` log-probabilities each member gives the true next token, over the M valid positions."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [N, T>=2], got {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        device, vocab = self.device, self.config.vocab_size
        rows: list[list[torch.Tensor]] = [[] for _ in self.members]
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device) if attention_mask is not None else None
            targets = ids[:, 1:]
            if mask is None:
                valid, position_ids = torch.ones_like(targets, dtype=torch.bool), None
            else:
                valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # right or left padding
            for k, member in enumerate(self.members):
                logits = member(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[
                    :, :-1, :vocab
                ]
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                rows[k].append(logp[valid])
        return torch.stack([torch.cat(r) for r in rows])

    @torch.no_grad()
    def fit_weights(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        steps: int = 50,
        batch_size: int = 4,
    ) -> list[float]:
        """Fit mixture weights maximizing the likelihood of ``input_ids`` ``[N, T]`` by EM (``combine="probs"``).

        Each member's probability of every true next token is computed once; then, ``steps`` times,
        ``w_k <- mean_t(w_k p_kt / sum_j w_j p_jt)`` starting from uniform weights. The result is set
        on the ensemble and its config, and returned.
        """
        if self.config.combine != "probs":
            raise ValueError(
                f"fit_weights fits mixture weights, which needs combine='probs' (got {self.config.combine!r})"
            )
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        log_p = self.member_token_log_probs(input_ids, attention_mask, batch_size=batch_size).double()
        if log_p.shape[1] == 0:
            raise ValueError("no valid next-token positions to fit the weights on")
        num = log_p.shape[0]
        log_w = torch.full((num, 1), -math.log(num), dtype=torch.float64, device=log_p.device)
        for _ in range(steps):
            joint = log_w + log_p
            responsibilities = joint - torch.logsumexp(joint, dim=0, keepdim=True)
            new_log_w = torch.logsumexp(responsibilities, dim=1, keepdim=True) - math.log(log_p.shape[1])
            converged = torch.allclose(new_log_w.exp(), log_w.exp(), atol=1e-10, rtol=0)
            log_w = new_log_w
            if converged:
                break
        weights = self.set_weights(log_w.exp().squeeze(1).tolist())
        logger.info("EM-fitted ensemble weights: %s", weights)
        return weights


def _member_config(config: dict[str, Any] | PreTrainedConfig) -> PreTrainedConfig:
    if isinstance(config, PreTrainedConfig):
        return config
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("member config has no model_type")
    config.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **config)


__all__ = ["COMBINE_MODES", "EnsembleCache", "StudentEnsemble", "StudentEnsembleConfig", "normalize_weights"]
