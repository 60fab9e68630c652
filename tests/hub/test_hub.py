"""`hf_efficiency.hub`: model card rendering and `push_to_hub`, against a fake Hub (no network).

`HfApi.create_repo` / `create_branch` / `create_commit` are patched on the class (so both our
`HfApi` and transformers' shared one are covered); the fake `create_commit` reads every
`CommitOperationAdd` while the temporary folder still exists, like a real upload.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, RepoUrl
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_efficiency
from hf_efficiency import EfficiencyConfig
from hf_efficiency.hub import push as push_module
from hf_efficiency.hub import render_model_card, save_model_card, template_text

BASE = "org/tiny-llama"
ENDPOINT = "https://huggingface.co"
SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


class FakeHub:
    """Records Hub calls; `commits[i]["files"]` maps path_in_repo -> uploaded bytes."""

    def __init__(self) -> None:
        self.repos: list[dict[str, Any]] = []
        self.branches: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeHub":
        hub = self

        def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kw):
            hub.repos.append({"repo_id": repo_id, "token": token, "private": private, "exist_ok": exist_ok, **kw})
            full = repo_id if "/" in repo_id else f"fake-user/{repo_id}"
            return RepoUrl(f"{ENDPOINT}/{full}", endpoint=ENDPOINT)

        def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kw):
            hub.branches.append({"repo_id": repo_id, "branch": branch, "token": token, "exist_ok": exist_ok})

        def create_commit(
            self,
            repo_id,
            operations,
            *,
            commit_message,
            commit_description=None,
            token=None,
            revision=None,
            create_pr=False,
            **kw,
        ):
            files = {}
            for op in operations:
                assert isinstance(op, CommitOperationAdd)
                with op.as_file() as fh:
                    files[op.path_in_repo] = fh.read()
            hub.commits.append(
                {
                    "repo_id": repo_id,
                    "paths": [op.path_in_repo for op in operations],
                    "files": files,
                    "commit_message": commit_message,
                    "commit_description": commit_description,
                    "token": token,
                    "revision": revision,
                    "create_pr": create_pr,
                }
            )
            return CommitInfo(
                commit_url=f"{ENDPOINT}/{repo_id}/commit/{'0' * 40}",
                commit_message=commit_message,
                commit_description=commit_description or "",
                oid="0" * 40,
                pr_url=f"{ENDPOINT}/{repo_id}/discussions/1" if create_pr else None,
            )

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self

    def write(self, folder: Path, index: int = -1) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for path, data in self.commits[index]["files"].items():
            (folder / path).write_bytes(data)
        return folder


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    return FakeHub().install(monkeypatch)


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("float")
    _tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(float_dir: Path) -> LlamaForCausalLM:
    cfg = EfficiencyConfig(base_model=BASE, quantization={"bits": 4, "group_size": 32, "clip": "none"})
    return AutoModelForCausalLM.from_pretrained(float_dir, efficiency_config=cfg).eval()


IDS = torch.tensor([[1, 5, 9, 33, 77, 127, 0, 64]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# --- push_to_hub ------------------------------------------------------------------------------
def test_push_single_file_exact_operations(quantized, hub: FakeHub) -> None:
    info = hf_efficiency.hub.push_to_hub(quantized, "tiny-4bit", private=True, token="hf_x")
    assert hub.repos == [{"repo_id": "tiny-4bit", "token": "hf_x", "private": True, "exist_ok": True}]
    assert hub.branches == []
    (commit,) = hub.commits
    assert commit["repo_id"] == "fake-user/tiny-4bit"  # the id create_repo returned
    assert commit["paths"] == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert commit["commit_message"] == push_module.DEFAULT_COMMIT_MESSAGE
    assert (commit["commit_description"], commit["revision"], commit["create_pr"], commit["token"]) == (
        None,
        None,
        False,
        "hf_x",
    )
    assert isinstance(info, CommitInfo) and info.repo_url.repo_id == "fake-user/tiny-4bit"
    assert json.loads(commit["files"]["config.json"])["quantization_config"]["quant_method"] == "hf_efficiency"
    assert 'from_pretrained("fake-user/tiny-4bit")' in commit["files"]["README.md"].decode()


def test_push_sharded_with_commit_options(quantized, hub: FakeHub) -> None:
    info = quantized.push_to_hub(
        "me/tiny-4bit",
        commit_message="add int4",
        commit_description="tiny test",
        revision="dev",
        create_pr=True,
        max_shard_size="20KB",
    )
    assert hub.branches == [{"repo_id": "me/tiny-4bit", "branch": "dev", "token": None, "exist_ok": True}]
    (commit,) = hub.commits
    assert (commit["commit_message"], commit["commit_description"], commit["revision"], commit["create_pr"]) == (
        "add int4",
        "tiny test",
        "dev",
        True,
    )
    shards = [p for p in commit["paths"] if SHARD.match(p)]
    n = len(shards)
    assert n > 1
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(commit["paths"]) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors.index.json", *shards]
    )
    index = json.loads(commit["files"]["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) == set(shards)
    assert info.pr_revision == "refs/pr/1"


@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_uploaded_checkpoint_reloads_bit_identical(quantized, hub: FakeHub, tmp_path: Path, shard: str) -> None:
    hf_efficiency.hub.push_to_hub(quantized, "me/tiny-4bit", max_shard_size=shard)
    folder = hub.write(tmp_path / "repo")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain from_pretrained
    assert isinstance(reloaded.config.quantization_config, EfficiencyConfig)
    assert torch.equal(_logits(reloaded), _logits(quantized))


def test_unknown_kwarg_is_type_error(quantized, hub: FakeHub) -> None:
    with pytest.raises(TypeError, match="safe_serialization"):
        hf_efficiency.hub.push_to_hub(quantized, "me/x", safe_serialization=True)
    with pytest.raises(TypeError, match="'bogus'"):
        quantized.push_to_hub("me/x", bogus=1)
    with pytest.raises(TypeError):
        hf_efficiency.hub.push_to_hub(quantized, "me/x", "positional commit message")
    assert hub.repos == [] and hub.commits == []


# --- routing of the patched PreTrainedModel.push_to_hub ---------------------------------------
def test_patched_method_routes_by_config(quantized, float_dir: Path, hub: FakeHub, monkeypatch) -> None:
    import transformers.utils.hub as tf_hub

    ours: list[tuple[Any, str]] = []
    real = push_module.push_to_hub

    def spy(model, repo_id, *args, **kwargs):
        ours.append((model, repo_id))
        return real(model, repo_id, *args, **kwargs)

    monkeypatch.setattr(push_module, "push_to_hub", spy)
    # transformers' original fetches the remote card; keep it offline.
    plain_card = ModelCard("---\nlibrary_name: transformers\n---\nplain\n")
    monkeypatch.setattr(tf_hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None: plain_card)

    quantized.push_to_hub("me/quantized", tags=["mine"])
    assert ours == [(quantized, "me/quantized")]
    card = ModelCard(hub.commits[-1]["files"]["README.md"].decode())
    assert "hf-efficiency" in card.data.tags and "mine" in card.data.tags

    plain = AutoModelForCausalLM.from_pretrained(float_dir)
    plain.push_to_hub("me/plain")
    assert len(ours) == 1  # ours did not run
    commit = hub.commits[-1]
    assert commit["repo_id"] == "me/plain" and commit["commit_message"] == "Upload LlamaForCausalLM"
    assert "hf-efficiency" not in commit["files"]["README.md"].decode()


# --- model card -------------------------------------------------------------------------------
def test_readme_front_matter_and_table(quantized, hub: FakeHub, tmp_path: Path) -> None:
    hf_efficiency.hub.push_to_hub(quantized, "me/tiny-4bit", tags=["mine", "quantized"])
    card = ModelCard.load(hub.write(tmp_path / "repo") / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == BASE  # from quantization_config.base_model
    assert data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["hf-efficiency", "quantized", "4-bit", "rtn", "mine"]
    text = card.text
    assert "| bits | 4 |" in text and "| group size | 32 |" in text
    assert "| symmetric | False |" in text and "| clip | none |" in text
    assert "| quantized linear layers | 14 |" in text
    # 4-bit codes + fp16 scale and minimum per 32 weights = 4 + 2 * 16 / 32 bits.
    assert "| bits per weight stored (codes + scales + minima) | 5.000 |" in text
    assert "## Evaluation" not in text and "perplexity" not in text
    assert "pip install hf-efficiency" in text and "{{" not in text
    config_json = re.search(r"```json\n(.*?)\n```", text, re.S).group(1)
    assert EfficiencyConfig(**json.loads(config_json)) == quantized.config.quantization_config


def test_stats_match_modules(quantized) -> None:
    layers = [m for m in quantized.modules() if getattr(m, "hf_efficiency_quantized", False)]
    stats = hf_efficiency.hub.quantization_stats(quantized)
    weights = sum(m.in_features * m.out_features for m in layers)
    assert stats["quantized_layers"] == len(layers) == 14
    assert stats["bits_per_weight"] == pytest.approx(
        sum(m.storage_bits_per_weight * m.in_features * m.out_features for m in layers) / weights
    )
    assert stats["total_bytes"] > stats["quantized_bytes"] > 0


def test_base_model_override_and_unknown(quantized, monkeypatch) -> None:
    card = render_model_card(quantized, base_model="other/base")
    assert card.data.base_model == "other/base"
    cfg = EfficiencyConfig(**{**quantized.config.quantization_config.to_dict(), "base_model": None})
    monkeypatch.setattr(quantized.config, "quantization_config", cfg)
    data = render_model_card(quantized).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert "hf-efficiency" in data["tags"]


METRICS = {"perplexity": 12.5, "reference_perplexity": 12.0, "tokens_per_s": 55.25, "protocol": "KJV held-out"}


def _assert_metrics(text: str) -> None:
    assert "## Evaluation" in text
    assert "| perplexity | 12.500 |" in text
    assert "| fp32 reference perplexity | 12.000 |" in text
    assert "| perplexity delta | +4.17 % |" in text
    assert "| decode tokens/s | 55.25 |" in text
    assert "KJV held-out" in text


def test_metrics_given(quantized, hub: FakeHub) -> None:
    hf_efficiency.hub.push_to_hub(quantized, "me/tiny-4bit", metrics=METRICS)
    _assert_metrics(hub.commits[-1]["files"]["README.md"].decode())


def test_metrics_from_eval_file_and_attribute(quantized, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "hf_efficiency_eval.json").write_text(json.dumps(METRICS))
    monkeypatch.setattr(quantized.config, "_name_or_path", str(tmp_path))
    _assert_metrics(render_model_card(quantized).text)

    monkeypatch.setattr(quantized.config, "_name_or_path", str(tmp_path / "missing"))
    assert "## Evaluation" not in render_model_card(quantized).text
    monkeypatch.setattr(quantized, "hf_efficiency_metrics", {"perplexity": 12.5}, raising=False)
    text = render_model_card(quantized).text
    assert "| perplexity | 12.500 |" in text and "reference" not in text


def test_save_model_card_and_bad_input(quantized, tmp_path: Path, float_dir: Path) -> None:
    path = save_model_card(quantized, tmp_path, repo_id="me/tiny-4bit", tags="extra")
    card = ModelCard.load(path)
    assert path.name == "README.md" and card.data.tags[-1] == "extra"
    assert "# tiny-4bit" in card.text
    with pytest.raises(TypeError, match="metrics"):
        render_model_card(quantized, metrics=[12.5])
    with pytest.raises(TypeError, match="perplexity"):
        render_model_card(quantized, metrics={"perplexity": "low"})
    with pytest.raises(ValueError, match="EfficiencyConfig"):
        render_model_card(AutoModelForCausalLM.from_pretrained(float_dir))


def test_template_is_found() -> None:
    text = template_text()
    assert text.startswith("---\n{{card_data}}\n---") and "{{metrics_section}}" in text


# --- push_to_hub(export_format=...) --------------------------------------------------------------
def test_push_export_uploads_the_format_and_an_engine_card(float_dir: Path, hub: FakeHub, tmp_path: Path) -> None:
    cfg = EfficiencyConfig(
        base_model=BASE, quantization={"bits": 4, "group_size": 32, "clip": "none", "zero_point": "integer"}
    )
    model = AutoModelForCausalLM.from_pretrained(float_dir, efficiency_config=cfg).eval()
    model.push_to_hub("me/tiny-awq", export_format="awq")
    (commit,) = hub.commits
    assert commit["paths"] == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    qc = json.loads(commit["files"]["config.json"])["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["bits"], qc["group_size"]) == ("awq", "gemm", 4, 32)
    card = commit["files"]["README.md"].decode()
    assert "vllm serve me/tiny-awq --quantization awq" in card
    assert "every quantized weight is written exactly" in card and "base_model: org/tiny-llama" in card
    # what was uploaded loads back with the same logits through our AWQ reader
    again = hf_efficiency.load_compressed(hub.write(tmp_path / "down"), dtype=torch.float32)
    assert torch.equal(_logits(again), _logits(model))


def test_push_export_refuses_before_uploading(quantized, hub: FakeHub) -> None:
    with pytest.raises(hf_efficiency.export.ExportError, match="float minima are not whole steps"):
        quantized.push_to_hub("me/tiny-gptq", export_format="gptq")
    assert hub.commits == [] and hub.repos == []  # nothing created
    with pytest.raises(TypeError, match="lossy=, tokenizer= and export_options= apply with export_format= only"):
        quantized.push_to_hub("me/tiny", lossy=True)
