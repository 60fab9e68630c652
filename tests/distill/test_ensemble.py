"""Students built from teacher layers, training snapshots, and the `StudentEnsemble` causal LM."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
import torch
from conftest import make_tiny_llama
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hf_efficiency.distill.ensemble import (
    EnsembleCache,
    StudentEnsemble,
    StudentEnsembleConfig,
    normalize_weights,
)
from hf_efficiency.distill.snapshots import SnapshotCallback, list_snapshots
from hf_efficiency.distill.student import make_student, select_layers

TEXT = "the quick brown fox jumps over the lazy dog. " * 30


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _windows(tokenizer, length: int = 32) -> torch.Tensor:
    ids = torch.tensor(tokenizer(TEXT)["input_ids"])
    n = ids.numel() // length
    return ids[: n * length].view(n, length)


def _sharp_llama(seed: int, **overrides: Any):
    # A larger init spreads the logits, so greedy decoding has no near-ties.
    return make_tiny_llama(seed, initializer_range=0.2, **overrides)


# --------------------------------------------------------------------------------------------------
# make_student
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_student_with_all_layers_reproduces_teacher(tie):
    teacher = make_tiny_llama(0, tie=tie, num_hidden_layers=4)
    student = make_student(teacher, 4)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    assert student.config.distilled_from_layers == [0, 1, 2, 3]
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("tie", [True, False])
def test_student_copies_exactly_the_chosen_layers(tie):
    teacher = make_tiny_llama(0, tie=tie, num_hidden_layers=6)
    before = _state(teacher)
    student = make_student(teacher, 3)  # uniform: round(linspace(0, 5, 3)) = [0, 2, 5]
    chosen = student.config.distilled_from_layers
    assert chosen == [0, 2, 5]
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert teacher.config.num_hidden_layers == 6 and not hasattr(teacher.config, "distilled_from_layers")

    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))
    for name, param in student.named_parameters(remove_duplicate=False):
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            source = teacher_params[f"model.layers.{chosen[int(idx)]}.{rest}"]
        else:
            source = teacher_params[name]
        assert torch.equal(param, source), name
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    assert student.config.tie_word_embeddings == tie

    # deep copies: no shared storage, and the teacher is untouched
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_student_renumbers_layers_and_generates_with_cache():
    teacher = _sharp_llama(0, num_hidden_layers=6)
    student = make_student(teacher, layers=[1, 3, 4])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    ids = torch.randint(0, 256, (1, 8))
    cached = student.generate(ids, max_new_tokens=10, do_sample=False)
    uncached = student.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (1, 18)
    assert torch.equal(cached, uncached)


def test_student_config_round_trip(tmp_path):
    student = make_student(make_tiny_llama(0, num_hidden_layers=6), layers=[0, 5])
    student.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["distilled_from_layers"] == [0, 5]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.distilled_from_layers == [0, 5]
    assert loaded.config.num_hidden_layers == 2
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, student(ids).logits)


def test_student_slices_per_layer_config_lists():
    kinds = ["a", "b", "c", "d", "e", "f"]
    teacher = make_tiny_llama(0, num_hidden_layers=6, mlp_layer_types=kinds, mlp_only_layers=[2, 5])
    student = make_student(teacher, layers=[0, 2, 5])
    assert student.config.mlp_layer_types == ["a", "c", "f"]
    assert student.config.mlp_only_layers == [1, 2]  # teacher layers 2, 5 are student layers 1, 2
    assert teacher.config.mlp_layer_types == kinds


def test_student_dtype():
    student = make_student(make_tiny_llama(0, num_hidden_layers=4), 2, dtype=torch.bfloat16)
    assert student.dtype == torch.bfloat16 and student.lm_head.weight.dtype == torch.bfloat16


def test_select_layers_strategies():
    assert select_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(6, 3, strategy="uniform") == [0, 2, 5]
    assert select_layers(12, 4)[0] == 0 and select_layers(12, 4)[-1] == 11
    assert select_layers(6, strategy="every_other") == [0, 2, 4]
    assert select_layers(7, strategy="every_other") == [0, 2, 4, 6]
    assert select_layers(6, 2, strategy="every_other") == [0, 2]
    assert select_layers(6, 4, strategy="every_other") == [0, 2, 4, 5]
    assert select_layers(6, 2, strategy="first") == [0, 1]
    assert select_layers(6, 2, strategy="last") == [4, 5]
    assert select_layers(6, 1) == [0]
    assert select_layers(6, layers=[1, 4]) == [1, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 0},
        {"num_layers": 7},
        {"layers": [1, 1]},
        {"layers": [0, 6]},
        {"layers": [-1]},
        {"layers": [3, 1]},
        {"layers": []},
        {"layers": [0, 1], "num_layers": 3},
        {"num_layers": 2, "strategy": "random"},
        {"strategy": "first"},
    ],
)
def test_make_student_rejects_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        make_student(make_tiny_llama(0, num_hidden_layers=6), **kwargs)


# --------------------------------------------------------------------------------------------------
# SnapshotCallback
# --------------------------------------------------------------------------------------------------


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def _args(output_dir, **overrides) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, byte_tokenizer):
    out = tmp_path_factory.mktemp("snapshot_run")
    model = make_tiny_llama(0).train()
    trainer = Trainer(
        model=model,
        args=_args(out),
        train_dataset=RowDataset(_windows(byte_tokenizer)[:12]),
        callbacks=[SnapshotCallback(every_n_steps=2)],
    )
    trainer.train()
    return out / "snapshots", trainer.model


def test_snapshot_callback_every_n_steps(snapshot_run):
    folder, final_model = snapshot_run
    entries = list_snapshots(folder)
    assert [e["step"] for e in entries] == [2, 4, 6]
    assert [e["path"] for e in entries] == ["snapshot-000002", "snapshot-000004", "snapshot-000006"]
    assert all(e["eval_loss"] is None and e["epoch"] > 0 for e in entries)
    states = []
    for e in entries:
        assert os.path.isfile(os.path.join(folder, e["path"], "model.safetensors"))
        states.append(_state(AutoModelForCausalLM.from_pretrained(os.path.join(folder, e["path"]))))
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        assert any(not torch.equal(states[a][k], states[b][k]) for k in states[a])
    final = final_model.state_dict()
    assert all(torch.equal(v, final[k].cpu()) for k, v in states[-1].items())


def test_snapshot_callback_epochs_eval_loss_and_keep_last(tmp_path, byte_tokenizer):
    windows = _windows(byte_tokenizer)
    args = _args(tmp_path, max_steps=-1, num_train_epochs=3, eval_strategy="epoch")
    trainer = Trainer(
        model=make_tiny_llama(1).train(),
        args=args,
        train_dataset=RowDataset(windows[:8]),
        eval_dataset=RowDataset(windows[8:10]),
        callbacks=[SnapshotCallback(keep_last=2)],
    )
    trainer.train()
    folder = tmp_path / "snapshots"
    entries = list_snapshots(folder)
    assert [e["step"] for e in entries] == [8, 12]  # 4 steps per epoch; the epoch-1 snapshot was pruned
    assert not (folder / "snapshot-000004").exists()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["snapshot-000008", "snapshot-000012"]
    evals = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    for e in entries:
        assert e["eval_loss"] == pytest.approx(evals[e["step"]])
        assert e["epoch"] == pytest.approx(e["step"] / 4)


def test_snapshot_callback_skips_existing_and_saves_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(make_tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    args = _args(tmp_path)
    callback = SnapshotCallback(every_n_steps=3, output_dir=str(tmp_path / "snaps"))
    state, control = TrainerState(), TrainerControl()
    state.global_step, state.epoch = 3, 0.5
    callback.on_step_end(args, state, control, model=model)
    snap = tmp_path / "snaps" / "snapshot-000003"
    assert (snap / "adapter_config.json").is_file() and (snap / "adapter_model.safetensors").is_file()
    assert not (snap / "model.safetensors").exists()
    (snap / "marker").write_text("kept")
    callback.on_step_end(args, state, control, model=model)  # e.g. a resumed run: not rewritten
    assert (snap / "marker").read_text() == "kept"
    assert len(list_snapshots(tmp_path / "snaps")) == 1
    state.global_step = 4
    callback.on_step_end(args, state, control, model=model)  # not a multiple of 3
    state.global_step, state.is_world_process_zero = 6, False
    callback.on_step_end(args, state, control, model=model)  # not the main process
    assert [e["step"] for e in list_snapshots(tmp_path / "snaps")] == [3]
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), snap)  # same base weights (seed 0)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_list_snapshots_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_snapshots(tmp_path)


# --------------------------------------------------------------------------------------------------
# StudentEnsemble
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def members():
    return [_sharp_llama(0), _sharp_llama(1, tie=False)]


def test_config_is_a_v5_dataclass_config():
    config = StudentEnsembleConfig(
        member_configs=[{"model_type": "llama", "vocab_size": 300}, {"model_type": "llama", "vocab_size": 257}]
    )
    assert config.model_type == "hf_efficiency_student_ensemble"
    assert config.combine == "probs" and config.weights is None and config.vocab_size == 257
    assert StudentEnsembleConfig.from_dict(config.to_dict()).member_configs == config.member_configs
    with pytest.raises(ValueError):
        StudentEnsembleConfig(combine="mean")


def test_single_member_equals_member():
    member = _sharp_llama(0)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        reference = member(ids).logits
        for combine in ("probs", "log_probs"):
            out = StudentEnsemble.from_models([member], weights=[1.0], combine=combine)(ids).logits
            assert torch.allclose(out.softmax(-1), reference.softmax(-1), atol=1e-6)
        assert torch.equal(StudentEnsemble.from_models([member], combine="logits")(ids).logits, reference)


def test_probs_mixture_and_other_combines(members):
    ids = torch.randint(0, 256, (2, 9))
    w = [0.25, 0.75]
    with torch.no_grad():
        l0, l1 = (m(ids).logits for m in members)
        probs = StudentEnsemble.from_models(members, weights=w)(ids).logits
        assert torch.allclose(probs.softmax(-1), w[0] * l0.softmax(-1) + w[1] * l1.softmax(-1), atol=1e-6)
        assert torch.allclose(probs.exp().sum(-1), torch.ones(2, 9), atol=1e-5)  # already normalized
        logits = StudentEnsemble.from_models(members, weights=w, combine="logits")(ids).logits
        assert torch.allclose(logits, w[0] * l0 + w[1] * l1, atol=1e-6)
        log_probs = StudentEnsemble.from_models(members, weights=w, combine="log_probs")(ids).logits
        expected = w[0] * l0.log_softmax(-1) + w[1] * l1.log_softmax(-1)
        assert torch.allclose(log_probs, expected, atol=1e-5)


def test_members_with_different_vocab_sizes_are_cut_to_the_common_one():
    small, big = _sharp_llama(0), _sharp_llama(1, vocab_size=300)
    ensemble = StudentEnsemble.from_models([small, big])
    assert ensemble.config.vocab_size == 257
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        out = ensemble(ids).logits
        mix = 0.5 * small(ids).logits.softmax(-1) + 0.5 * big(ids).logits[..., :257].softmax(-1)
    assert out.shape == (1, 7, 257)
    assert torch.allclose(out.softmax(-1), mix, atol=1e-6)


def test_loss_is_the_mixture_cross_entropy(members):
    ids = torch.randint(0, 256, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    w = [0.4, 0.6]
    ensemble = StudentEnsemble.from_models(members, weights=w)
    with torch.no_grad():
        out = ensemble(input_ids=ids, labels=labels)
        mix = w[0] * members[0](ids).logits.softmax(-1) + w[1] * members[1](ids).logits.softmax(-1)
    targets = labels[:, 1:]
    valid = targets != -100
    nll = -mix[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).log()[valid]
    assert out.loss.item() == pytest.approx(nll.mean().item(), rel=1e-5)
    with torch.no_grad():
        summed = ensemble(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    assert summed.item() == pytest.approx(nll.sum().item() / 40, rel=1e-5)


def test_greedy_generate_with_cache_matches_full_recompute(members):
    ensemble = StudentEnsemble.from_models(members, weights=[0.3, 0.7])
    prompt = torch.randint(0, 256, (1, 6))
    generated = ensemble.generate(prompt, max_new_tokens=12, do_sample=False)
    sequence = prompt
    with torch.no_grad():
        for _ in range(12):
            next_token = ensemble(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=-1)
    assert torch.equal(generated, sequence)

    out = ensemble.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, EnsembleCache) and len(out.cache.caches) == 2
    assert out.cache.get_seq_length() == prompt.shape[1] + 3
    assert all(c.get_seq_length() == prompt.shape[1] + 3 for c in out.cache.caches)


def test_forward_with_an_ensemble_cache(members):
    ensemble = StudentEnsemble.from_models(members, weights=[0.5, 0.5])
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = ensemble(ids, use_cache=False)
        assert full.cache is None
        prefix = ensemble(ids[:, :-1])
        assert isinstance(prefix.cache, EnsembleCache) and prefix.cache.get_seq_length() == 8
        step = ensemble(ids[:, -1:], past_key_values=prefix.cache)  # the v4 name is accepted too
        assert step.cache is prefix.cache and step.cache.get_seq_length() == 9
        assert torch.allclose(step.logits[:, -1], full.logits[:, -1], atol=1e-5)
        with pytest.raises(TypeError):
            ensemble(ids, cache=prefix.cache.caches[0])


def test_zero_weight_member_is_ignored(members):
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        reference = members[0](ids).logits.log_softmax(-1)
        for combine in ("probs", "log_probs"):
            out = StudentEnsemble.from_models(members, weights=[1.0, 0.0], combine=combine)(ids).logits
            assert torch.allclose(out, reference, atol=1e-5)


def test_sampling_is_seeded(members):
    ensemble = StudentEnsemble.from_models(members)
    prompt = torch.randint(0, 256, (2, 5))
    torch.manual_seed(123)
    first = ensemble.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True, num_return_sequences=2
    )
    torch.manual_seed(123)
    second = ensemble.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True, num_return_sequences=2
    )
    assert first.shape == (4, 13)
    assert torch.equal(first, second)
    assert torch.equal(first[0, :5], prompt[0]) and torch.equal(first[1, :5], prompt[0])


def test_beam_search_reorders_every_member_cache(members):
    prompt = torch.randint(0, 256, (1, 6))
    single = StudentEnsemble.from_models(members[:1])
    assert torch.equal(
        single.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False),
        members[0].generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False),
    )
    ensemble = StudentEnsemble.from_models(members, weights=[0.5, 0.5])
    cached = ensemble.generate(prompt, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    uncached = ensemble.generate(
        prompt, max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, use_cache=False
    )
    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generate_matches_rows(members, byte_tokenizer, monkeypatch):
    ensemble = StudentEnsemble.from_models(members, weights=[0.6, 0.4])
    texts = ["hello there", "hi"]
    monkeypatch.setattr(byte_tokenizer, "padding_side", "left")  # the fixture is session-wide
    batch = byte_tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0
    generated = ensemble.generate(**batch, max_new_tokens=8, do_sample=False)
    for i, text in enumerate(texts):
        row = byte_tokenizer([text], return_tensors="pt")
        alone = ensemble.generate(**row, max_new_tokens=8, do_sample=False)
        assert generated[i, -8:].tolist() == alone[0, -8:].tolist()


def test_static_cache_is_refused(members):
    ensemble = StudentEnsemble.from_models(members)
    with pytest.raises(NotImplementedError):
        ensemble.generate(torch.randint(0, 256, (1, 4)), max_new_tokens=2, cache_implementation="static")


def test_ensemble_is_inference_only(members):
    ensemble = StudentEnsemble.from_models(members)
    assert not any(p.requires_grad for p in ensemble.parameters())
    assert not any(m.training for m in ensemble.members)


def test_save_and_load_round_trip(members, tmp_path):
    ensemble = StudentEnsemble.from_models(members, weights=[0.2, 0.8], combine="log_probs")
    ensemble.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "hf_efficiency_student_ensemble"
    assert config["weights"] == [0.2, 0.8] and config["combine"] == "log_probs"
    ids = torch.randint(0, 256, (2, 7))
    restored = StudentEnsemble.from_pretrained(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, StudentEnsemble)
    with torch.no_grad():
        expected = ensemble(ids).logits
        assert torch.equal(restored(ids).logits, expected)
        assert torch.equal(auto(ids).logits, expected)
        for k, member in enumerate(members):
            alone = AutoModelForCausalLM.from_pretrained(tmp_path / "members" / str(k))
            assert torch.equal(alone(ids).logits, member(ids).logits)
    assert restored.weights == pytest.approx([0.2, 0.8]) and restored.combine == "log_probs"
    # the bare config rebuilds the architecture (random members)
    assert StudentEnsemble(StudentEnsembleConfig.from_pretrained(tmp_path))(ids).logits.shape == (2, 7, 257)


def test_push_to_hub_uploads_the_whole_folder(members, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    uploaded: dict[str, Any] = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(
            os.path.relpath(os.path.join(root, f), folder_path)
            for root, _, files in os.walk(folder_path)
            for f in files
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    StudentEnsemble.from_models(members).push_to_hub("org/ensemble")
    assert uploaded["repo_id"] == "org/ensemble"
    assert "config.json" in uploaded["files"]
    assert os.path.join("members", "1", "model.safetensors") in uploaded["files"]


def test_weight_validation(members):
    assert normalize_weights([1, 3], 2) == [0.25, 0.75]
    assert StudentEnsemble.from_models(members, weights=[2, 2]).weights == [0.5, 0.5]
    for bad in ([1.0, -0.5], [1.0], [1.0, 2.0, 3.0], [0.0, 0.0]):
        with pytest.raises(ValueError):
            StudentEnsemble.from_models(members, weights=bad)
    ensemble = StudentEnsemble.from_models(members)
    assert ensemble.set_weights([3, 1]) == [0.75, 0.25] and ensemble.config.weights == [0.75, 0.25]


@pytest.fixture(scope="module")
def trained_member(byte_tokenizer):
    """A tiny llama that has learned the repetitive TEXT."""
    torch.manual_seed(0)
    windows = _windows(byte_tokenizer)
    model = make_tiny_llama(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        batch = windows[torch.randint(0, len(windows), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_fit_weights_prefers_the_good_member(trained_member, byte_tokenizer):
    data = _windows(byte_tokenizer)[:12]
    ensemble = StudentEnsemble.from_models([make_tiny_llama(7), trained_member])
    weights = ensemble.fit_weights(data, steps=50, batch_size=4)
    assert weights[1] > 0.9
    assert sum(weights) == pytest.approx(1.0)
    assert ensemble.weights == weights and ensemble.config.weights == weights
    with torch.no_grad():
        fitted = ensemble(input_ids=data, labels=data).loss.item()
        best = min(m(input_ids=data, labels=data).loss.item() for m in ensemble.members)
    assert fitted <= best + 1e-6

    mask = torch.ones_like(data)
    mask[:, :4] = 0
    assert ensemble.fit_weights(data, attention_mask=mask, steps=5)[1] > 0.9
    with pytest.raises(ValueError):
        StudentEnsemble.from_models(ensemble.members, combine="logits").fit_weights(data)


def test_from_snapshots(snapshot_run, tmp_path):
    folder, final_model = snapshot_run
    ensemble = StudentEnsemble.from_snapshots(folder)
    assert len(ensemble.members) == 3 and ensemble.weights == pytest.approx([1 / 3] * 3)
    linear = StudentEnsemble.from_snapshots(folder, last=2, weights="linear")
    assert len(linear.members) == 2 and linear.weights == pytest.approx([1 / 3, 2 / 3])
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():  # the newest member is the final model
        assert torch.equal(linear.members[1](ids).logits, final_model.cpu()(ids).logits)
    explicit = StudentEnsemble.from_snapshots(folder, weights=[1, 1, 2], combine="logits")
    assert explicit.weights == pytest.approx([0.25, 0.25, 0.5]) and explicit.combine == "logits"
    with pytest.raises(ValueError):
        StudentEnsemble.from_snapshots(folder, weights="eval_loss")  # no evaluation in that run
    with pytest.raises(ValueError):
        StudentEnsemble.from_snapshots(folder, weights=[1, 2])
    with pytest.raises(ValueError):
        StudentEnsemble.from_snapshots(folder, weights=[1, -1, 1])
    with pytest.raises(ValueError):
        StudentEnsemble.from_snapshots(folder, weights="best")

    copy = tmp_path / "snapshots"
    shutil.copytree(folder, copy)
    entries = list_snapshots(copy)
    for entry, loss in zip(entries, [3.0, 2.0, 1.0]):
        entry["eval_loss"] = loss
    (copy / "snapshots.json").write_text(json.dumps(entries))
    by_loss = StudentEnsemble.from_snapshots(copy, weights="eval_loss")
    expected = torch.softmax(-torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 0).tolist()
    assert by_loss.weights == pytest.approx(expected)
