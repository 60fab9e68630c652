"""`push_to_hub` for models carrying an `EfficiencyConfig` (routed here by `hf_efficiency.integration.registry`).

Same signature and semantics as transformers' ``PushToHubMixin.push_to_hub``: create the repo
(``exist_ok=True``), ``save_pretrained`` into a temporary folder, write our model card as
``README.md``, and upload everything in one commit.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from torch import nn
from transformers.utils import logging

from .model_card import render_export_card, save_model_card

logger = logging.get_logger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload hf-efficiency quantized model"


def _api() -> HfApi:
    from .. import __version__

    return HfApi(library_name="hf-efficiency", library_version=__version__)


def _operations(folder: str) -> list[CommitOperationAdd]:
    """One `CommitOperationAdd` per file under ``folder`` (sorted, POSIX paths in the repo)."""
    ops = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            in_repo = os.path.relpath(path, folder).replace(os.sep, "/")
            ops.append(CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=path))
    return sorted(ops, key=lambda op: op.path_in_repo)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "5GB",
    tags: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    export_format: str | None = None,
    lossy: bool = False,
    tokenizer: Any = None,
    export_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> CommitInfo:
    """Upload ``model`` (weights, configs and the hf-efficiency model card) to ``repo_id``.

    ``tags``, ``metrics`` and ``base_model`` go to :func:`~hf_efficiency.hub.render_model_card`.
    ``export_format`` (``"compressed-tensors"``, ``"gptq"``, ``"awq"``, ``"gguf"``) uploads the export
    instead of our own format (`hf_efficiency.export.export_model` with ``lossy``, ``tokenizer`` and
    ``export_options``), with a model card saying which engines load it and how.
    Returns the `huggingface_hub.CommitInfo` of the commit (or pull request).
    """
    if kwargs:
        raise TypeError(f"push_to_hub() got unexpected keyword argument(s): {', '.join(map(repr, sorted(kwargs)))}")
    if not isinstance(repo_id, str) or not repo_id:
        raise TypeError(f"repo_id must be a non-empty string, got {repo_id!r}")
    if export_format is None and (lossy or tokenizer is not None or export_options):
        raise TypeError("lossy=, tokenizer= and export_options= apply with export_format= only")
    api = _api()
    with tempfile.TemporaryDirectory() as tmp_dir:
        report = None
        if export_format is not None:  # before the repo exists: a refused export creates nothing
            from ..export import export_model

            report = export_model(
                model,
                tmp_dir,
                export_format,
                lossy=lossy,
                tokenizer=tokenizer,
                max_shard_size=max_shard_size,
                **(export_options or {}),
            )
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        if report is None:
            model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            save_model_card(model, tmp_dir, base_model=base_model, metrics=metrics, tags=tags, repo_id=repo_id)
        else:
            card = render_export_card(model, report, repo_id=repo_id, base_model=base_model, tags=tags)
            card.save(os.path.join(tmp_dir, "README.md"))
        operations = _operations(tmp_dir)
        if revision is not None and not revision.startswith("refs/pr"):
            try:
                api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
            except HfHubHTTPError as err:  # no write access: the PR may still target the branch
                if not (create_pr and err.response is not None and err.response.status_code == 403):
                    raise
        logger.info(f"Uploading {', '.join(op.path_in_repo for op in operations)} to {repo_id}")
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )


def push_export(
    model: nn.Module,
    repo_id: str,
    report: Any,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload the folder an export already wrote (``report.path``, an `hf_efficiency.export.ExportReport`)
    with its model card (the folder itself is not changed)."""
    api = _api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = render_export_card(model, report, repo_id=repo_id, base_model=base_model, tags=tags)
    operations = [op for op in _operations(report.path) if op.path_in_repo != "README.md"]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload hf-efficiency {report.format} export",
        token=token,
    )
