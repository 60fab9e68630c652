"""DistillationTrainer and MutualDistillationTrainer on tiny Llamas: losses, GA invariance, teacher
handling, projections, caches, checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_llama
from safetensors import safe_open
from transformers import HfArgumentParser, PreTrainedTokenizerFast, default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from hf_efficiency.distill import (
    DistillationTrainer,
    DistillationTrainingArguments,
    MutualDistillationTrainer,
    MutualDistillationTrainingArguments,
    TeacherCache,
    cache_teacher_logprobs,
    list_snapshots,
    make_student,
)
from hf_efficiency.distill.losses import response_loss, token_mask
from hf_efficiency.distill.projections import PROJECTIONS_WEIGHTS

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
) * 6


class Rows(torch.utils.data.Dataset):
    """Fixed-length byte-token rows with labels = input_ids."""

    def __init__(self, n: int = 16, length: int = 24, offset: int = 0):
        ids = list(TEXT.encode())
        self.rows = [ids[offset + 7 * i : offset + 7 * i + length] for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.tensor(self.rows[i])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def _args(tmp_path, **kw) -> DistillationTrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        optim="sgd",
        lr_scheduler_type="constant",
        dataloader_drop_last=True,
    )
    base.update(kw)
    return DistillationTrainingArguments(**base)


def _pair(student_layers: int = 2, **student_overrides):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4)
    if student_overrides:
        student = make_tiny_llama(seed=2, num_hidden_layers=student_layers, **student_overrides)
    else:
        student = make_student(teacher, student_layers)
    return teacher, student


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    return default_data_collator([Rows()[i] for i in range(n)])


# ---------------------------------------------------------------- arguments


def test_arguments_parse_with_hf_argument_parser(tmp_path):
    (args,) = HfArgumentParser(DistillationTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--alpha",
            "0.3",
            "--distill_loss",
            "jsd",
            "--beta",
            "0.2",
            "--temperature",
            "2",
            "--feature_weight",
            "1",
            "--feature_layer_map",
            "2,4",
            "--use_cpu",
        ]
    )
    assert (args.alpha, args.distill_loss, args.beta, args.temperature) == (0.3, "jsd", 0.2, 2.0)
    assert args.feature_layer_indices == [2, 4]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"distill_loss": "kl"}, "distill_loss='kl' is not one of"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"feature_layer_map": "a,b"}, "feature_layer_map must be"),
        ({"relation_losses": "rkd_distance,foo"}, "relation_losses='foo'"),
        ({"snapshot_strategy": "steps"}, "snapshot_steps >= 1"),
        ({"teacher_cache_dir": "x", "feature_weight": 1.0}, "top-k log-probabilities"),
        ({"teacher_cache_dir": "x", "distill_loss": "reverse_kl"}, "only 'forward_kl' and 'soft_ce'"),
        ({"teacher_model_init_kwargs": "{bad"}, "not valid JSON"),
    ],
)
def test_arguments_reject_bad_values(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kw)


# ---------------------------------------------------------------- teacher and loss


def test_teacher_is_frozen_eval_and_untouched_while_student_trains(tmp_path):
    teacher, student = _pair()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=Rows(), teacher_model=teacher)
    trainer.train()
    assert not trainer.teacher.training
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, s_before[k]) for k, v in student.state_dict().items())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and {"loss_response", "loss_lm"} <= set(logged[0])


def test_training_loss_is_alpha_mix_of_logit_kl_and_label_loss(tmp_path):
    teacher, student = _pair()
    args = _args(tmp_path, alpha=0.3, temperature=2.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=Rows(), teacher_model=teacher)
    batch = _batch()
    student.train()
    trainer.current_gradient_accumulation_steps = 1
    n = int(token_mask(batch["labels"]).sum())
    got = trainer.compute_loss(student, batch, num_items_in_batch=torch.tensor(n))
    with torch.no_grad():
        s_out = student(**batch)
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    kd = response_loss(s_out.logits, t_logits, token_mask(batch["labels"]), loss="forward_kl", temperature=2.0)
    assert got.item() == pytest.approx(0.3 * kd.item() + 0.7 * s_out.loss.item(), rel=1e-5)


def test_eval_loss_is_the_students_plain_label_loss(tmp_path):
    teacher, student = _pair()
    trainer = DistillationTrainer(
        model=student, args=_args(tmp_path, per_device_eval_batch_size=16), eval_dataset=Rows(), teacher_model=teacher
    )
    metrics = trainer.evaluate()
    with torch.no_grad():
        expected = student(**_batch(16)).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("extra", [{}, {"feature_weight": 0.5, "feature_loss": "cosine"}])
def test_gradient_accumulation_equals_larger_batch(tmp_path, extra):
    """GA=2 x batch 2 makes the same update as GA=1 x batch 4 (same rows, SGD, no dropout)."""
    results = []
    for bs, ga in ((4, 1), (2, 2)):
        teacher, student = _pair()
        args = _args(
            tmp_path / f"{bs}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=1,
            learning_rate=0.5,
            **extra,
        )
        trainer = DistillationTrainer(model=student, args=args, train_dataset=Rows(n=4), teacher_model=teacher)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(4))
        trainer.train()
        results.append({k: v.clone() for k, v in student.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


def test_mismatched_tokenizers_raise(tmp_path):
    teacher, student = _pair()
    tok = make_byte_tokenizer()
    vocab = dict(tok.get_vocab())
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    from tokenizers import Tokenizer, models

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])), eos_token="<eos>")
    with pytest.raises(ValueError, match="student and teacher tokenizers differ: 2 shared tokens"):
        DistillationTrainer(
            model=student,
            args=_args(tmp_path),
            train_dataset=Rows(),
            processing_class=tok,
            teacher_model=teacher,
            teacher_processing_class=other,
        )


def test_teacher_with_padded_larger_vocab_trains(tmp_path):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4, vocab_size=BYTE_VOCAB + 63)
    student = make_tiny_llama(seed=2)
    trainer = DistillationTrainer(
        model=student,
        args=_args(tmp_path),
        train_dataset=Rows(),
        teacher_model=teacher,
        processing_class=make_byte_tokenizer(),
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_tokenizer_larger_than_teacher_vocab_raises(tmp_path):
    teacher = make_tiny_llama(seed=1, vocab_size=200, pad_token_id=0, eos_token_id=1)
    with pytest.raises(ValueError, match="teacher's vocabulary has only 200"):
        DistillationTrainer(
            model=make_tiny_llama(seed=2),
            args=_args(tmp_path),
            train_dataset=Rows(),
            processing_class=make_byte_tokenizer(),
            teacher_model=teacher,
        )


def test_missing_teacher_and_wrong_args_type_raise(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationTrainer(model=make_tiny_llama(), args=_args(tmp_path), train_dataset=Rows())
    with pytest.raises(TypeError, match="needs DistillationTrainingArguments"):
        DistillationTrainer(
            model=make_tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path)), teacher_model=make_tiny_llama()
        )


def test_teacher_loaded_from_path_in_requested_dtype(tmp_path):
    teacher, student = _pair()
    teacher.save_pretrained(tmp_path / "teacher")
    make_byte_tokenizer().save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=student,
        args=_args(tmp_path, teacher_dtype="bfloat16"),
        train_dataset=Rows(),
        processing_class=make_byte_tokenizer(),
        teacher_model=str(tmp_path / "teacher"),
    )
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    trainer.train()


# ---------------------------------------------------------------- feature / attention / relation


def test_feature_projection_trains_saves_apart_and_resumes(tmp_path):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4)
    student = make_tiny_llama(seed=2, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    args = _args(tmp_path, feature_weight=1.0, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=Rows(), teacher_model=teacher)
    assert trainer.projector.layer_map == [2, 4]
    w0 = trainer.projector.maps[0].weight.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.projector.maps[0].weight, w0)
    assert any("loss_feature" in h for h in trainer.state.log_history)
    ckpt = get_last_checkpoint(args.output_dir)
    assert os.path.isfile(os.path.join(ckpt, PROJECTIONS_WEIGHTS))
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        assert not any("maps" in k for k in f.keys())
    # resume from the step-2 checkpoint restores the projections saved there
    ckpt2 = os.path.join(args.output_dir, "checkpoint-2")
    with safe_open(os.path.join(ckpt2, PROJECTIONS_WEIGHTS), "pt") as f:
        saved = f.get_tensor("maps.0.weight")
    fresh = DistillationTrainer(
        model=make_tiny_llama(seed=3, hidden_size=32, intermediate_size=64),
        args=_args(tmp_path, feature_weight=1.0, max_steps=2),
        train_dataset=Rows(),
        teacher_model=teacher,
    )
    fresh._load_from_checkpoint(ckpt2)
    torch.testing.assert_close(fresh.projector.maps[0].weight.detach(), saved)


def test_feature_map_defaults_to_copied_teacher_layers(tmp_path):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=6)
    student = make_student(teacher, layers=[0, 2, 5])
    trainer = DistillationTrainer(
        model=student, args=_args(tmp_path, feature_weight=1.0), train_dataset=Rows(), teacher_model=teacher
    )
    assert trainer.projector.layer_map == [1, 3, 6]
    assert not any(p.requires_grad for p in trainer.projector.parameters())  # same width: identity
    with pytest.raises(ValueError, match="feature_layer_map has 2 entries; the student has 3"):
        DistillationTrainer(
            model=student,
            args=_args(tmp_path, feature_weight=1.0, feature_layer_map="2,4"),
            train_dataset=Rows(),
            teacher_model=teacher,
        )


def test_attention_map_matching_needs_eager(tmp_path):
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4, attn_implementation="eager")
    student = make_tiny_llama(seed=2, attn_implementation="eager")
    trainer = DistillationTrainer(
        model=student, args=_args(tmp_path, attention_weight=1.0), train_dataset=Rows(), teacher_model=teacher
    )
    trainer.train()
    assert any("loss_attention" in h for h in trainer.state.log_history)
    sdpa = DistillationTrainer(
        model=make_tiny_llama(seed=2, attn_implementation="sdpa"),
        args=_args(tmp_path, attention_weight=1.0),
        train_dataset=Rows(),
        teacher_model=make_tiny_llama(seed=1, attn_implementation="sdpa"),
    )
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        sdpa.train()


def test_relation_losses_train(tmp_path):
    teacher, student = _pair()
    args = _args(tmp_path, alpha=0.0, relation_weight=1.0, relation_losses="rkd_distance,rkd_angle,token_similarity")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=Rows(), teacher_model=teacher)
    trainer.train()
    rel = [h["loss_relation"] for h in trainer.state.log_history if "loss_relation" in h]
    assert len(rel) == 3 and all(v > 0 for v in rel)


# ---------------------------------------------------------------- offline teacher cache


def test_full_vocab_cache_reproduces_online_forward_kl(tmp_path):
    teacher, student = _pair()
    cache = cache_teacher_logprobs(
        teacher, Rows(), tmp_path / "cache", top_k=BYTE_VOCAB, batch_size=3, shard_size=5, show_progress=False
    )
    index = json.loads((cache / "teacher_cache.json").read_text())
    assert index["examples"] == 16 and len(index["shards"]) == 4 and index["top_k"] == BYTE_VOCAB
    online = DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=Rows(), teacher_model=teacher)
    offline = DistillationTrainer(
        model=student, args=_args(tmp_path, teacher_cache_dir=str(cache)), train_dataset=Rows()
    )
    assert offline.teacher is None
    batch_online = _batch()
    batch_offline = offline.data_collator([offline.train_dataset[i] for i in range(4)])
    student.train()
    for t in (online, offline):
        t.current_gradient_accumulation_steps = 1
    a = online.compute_loss(student, batch_online, num_items_in_batch=torch.tensor(92))
    b = offline.compute_loss(student, batch_offline, num_items_in_batch=torch.tensor(92))
    assert b.item() == pytest.approx(a.item(), rel=2e-3)  # fp16 log-probs in the cache
    offline.train()


def test_cache_rejects_bad_top_k(tmp_path):
    teacher, _ = _pair()
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        cache_teacher_logprobs(teacher, Rows(n=2), tmp_path / "c", top_k=0, show_progress=False)
    with pytest.raises(ValueError, match=f"top_k=300 exceeds the teacher vocabulary \\({BYTE_VOCAB}\\)"):
        cache_teacher_logprobs(teacher, Rows(n=2), tmp_path / "c", top_k=300, show_progress=False)


def test_cache_collator_rejects_bad_padding_side():
    from hf_efficiency.distill import TeacherCacheCollator

    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        TeacherCacheCollator(default_data_collator, padding_side="middle")


def test_cache_rejects_other_data(tmp_path):
    teacher, _ = _pair()
    cache_teacher_logprobs(teacher, Rows(n=4), tmp_path / "c", top_k=4, show_progress=False)
    with pytest.raises(ValueError, match="cache has 4 rows but the dataset has 16"):
        DistillationTrainer(
            model=make_tiny_llama(), args=_args(tmp_path, teacher_cache_dir=str(tmp_path / "c")), train_dataset=Rows()
        )
    c = TeacherCache(tmp_path / "c")
    with pytest.raises(ValueError, match="does not match the teacher cache"):
        c.row(0, Rows(n=4, offset=1)[0]["input_ids"])
    with pytest.raises(FileNotFoundError, match="is not a teacher cache"):
        TeacherCache(tmp_path)


# ---------------------------------------------------------------- snapshots and checkpoints


def test_snapshot_strategy_steps_writes_snapshots(tmp_path):
    teacher, student = _pair()
    args = _args(tmp_path, max_steps=4, snapshot_strategy="steps", snapshot_steps=2)
    DistillationTrainer(model=student, args=args, train_dataset=Rows(), teacher_model=teacher).train()
    snaps = list_snapshots(os.path.join(args.output_dir, "snapshots"))
    assert [s["step"] for s in snaps] == [2, 4]


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def run(out, resume=None, max_steps=4):
        teacher, student = _pair()
        args = _args(
            tmp_path,
            output_dir=str(out),
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=2,
            optim="adamw_torch",
            learning_rate=1e-3,
        )
        trainer = DistillationTrainer(model=student, args=args, train_dataset=Rows(), teacher_model=teacher)
        trainer.train(resume_from_checkpoint=resume)
        return student.state_dict()

    full = run(tmp_path / "a")
    os.makedirs(tmp_path / "b", exist_ok=True)
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    for k in full:
        assert torch.equal(resumed[k], full[k]), k  # resume is exact (tests/distill/test_resume.py)


# ---------------------------------------------------------------- mutual distillation


def _mutual_args(tmp_path, **kw) -> MutualDistillationTrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "mutual"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        optim="sgd",
        lr_scheduler_type="constant",
        per_device_eval_batch_size=8,
    )
    base.update(kw)
    return MutualDistillationTrainingArguments(**base)


def test_mutual_dml_loss_trains_both_and_reports_each(tmp_path):
    a, b = make_tiny_llama(seed=1), make_tiny_llama(seed=2, num_hidden_layers=3)
    trainer = MutualDistillationTrainer(
        [a, b], _mutual_args(tmp_path, mutual_weight=0.4), train_dataset=Rows(), eval_dataset=Rows(n=8)
    )
    batch = _batch()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    n = torch.tensor(int(token_mask(batch["labels"]).sum()))
    got = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n)
    with torch.no_grad():
        oa, ob = a(**batch), b(**batch)
    m = token_mask(batch["labels"])
    expected = (
        oa.loss + 0.4 * response_loss(oa.logits, ob.logits, m) + ob.loss + 0.4 * response_loss(ob.logits, oa.logits, m)
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    before = [p.detach().clone() for p in (a.lm_head.weight, b.lm_head.weight)]
    trainer.train()
    assert not torch.equal(before[0], a.lm_head.weight) and not torch.equal(before[1], b.lm_head.weight)
    metrics = trainer.evaluate()
    with torch.no_grad():
        rows = default_data_collator([Rows(n=8)[i] for i in range(8)])
        la, lb = a(**rows).loss.item(), b(**rows).loss.item()
    assert metrics["eval_loss_student_0"] == pytest.approx(la, rel=1e-5)
    assert metrics["eval_loss_student_1"] == pytest.approx(lb, rel=1e-5)


def test_mutual_best_mode_picks_lowest_eval_loss_and_save_resume(tmp_path):
    good = make_tiny_llama(seed=1)
    bad = make_tiny_llama(seed=2)
    with torch.no_grad():
        bad.lm_head.weight.mul_(30)  # a much worse student
    trainer = MutualDistillationTrainer(
        [bad, good],
        _mutual_args(tmp_path, mutual_mode="best", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=Rows(),
        eval_dataset=Rows(n=8),
        learning_rates=[1e-2, 1e-3],
    )
    trainer.evaluate()
    assert trainer.best_index == 1
    assert [g["lr"] for g in trainer.create_optimizer().param_groups][:1] == [1e-2]
    trainer.train()
    ckpt = os.path.join(trainer.args.output_dir, "checkpoint-2")
    assert json.loads(open(os.path.join(ckpt, "mutual_state.json")).read())["best_index"] == 1
    fresh = MutualDistillationTrainer(
        [make_tiny_llama(seed=5), make_tiny_llama(seed=6)],
        _mutual_args(tmp_path, mutual_mode="best"),
        train_dataset=Rows(),
    )
    fresh._load_from_checkpoint(ckpt)
    assert fresh.best_index == 1
    torch.testing.assert_close(fresh.students[1].lm_head.weight, good.lm_head.weight)


def test_mutual_warmup_ramps_the_peer_weight(tmp_path):
    a, b = make_tiny_llama(seed=1), make_tiny_llama(seed=2)
    trainer = MutualDistillationTrainer(
        [a, b], _mutual_args(tmp_path, mutual_weight=1.0, mutual_warmup_steps=4), train_dataset=Rows()
    )
    batch = _batch()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        oa, ob = a(**batch), b(**batch)
    m = token_mask(batch["labels"])
    kl = response_loss(oa.logits, ob.logits, m) + response_loss(ob.logits, oa.logits, m)
    for step, ramp in ((0, 0.25), (1, 0.5), (7, 1.0)):
        trainer.state.global_step = step
        got = trainer.compute_loss(trainer.model, batch)
        assert got.item() == pytest.approx((oa.loss + ob.loss + ramp * kl).item(), rel=1e-5)


def test_mutual_clips_each_students_gradients_on_its_own(tmp_path):
    a, b = make_tiny_llama(seed=1), make_tiny_llama(seed=2)
    trainer = MutualDistillationTrainer([a, b], _mutual_args(tmp_path, max_grad_norm=1.0), train_dataset=Rows())
    for p in a.parameters():
        p.grad = torch.full_like(p, 1e-4)
    for p in b.parameters():
        p.grad = torch.full_like(p, 1.0)
    norm_a = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()]))
    assert norm_a < 1.0
    before = [p.grad.clone() for p in a.parameters()]
    largest = trainer._clip_grad_norm(trainer.model)
    assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), before))  # a below the limit: untouched
    norm_b = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in b.parameters()]))
    assert norm_b.item() == pytest.approx(1.0, rel=1e-4)
    assert largest.item() > 100


def test_mutual_rejects_single_student_and_bad_learning_rates(tmp_path):
    with pytest.raises(ValueError, match="at least 2 students"):
        MutualDistillationTrainer([make_tiny_llama()], _mutual_args(tmp_path))
    with pytest.raises(ValueError, match="learning_rates has 1 entries for 2 students"):
        MutualDistillationTrainer([make_tiny_llama(), make_tiny_llama()], _mutual_args(tmp_path), learning_rates=[1e-3])


def test_bf16_mixed_precision_flag_trains(tmp_path):
    teacher, student = _pair()
    args = _args(tmp_path, bf16=True, feature_weight=0.5, relation_weight=0.5)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=Rows(), teacher_model=teacher)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_mutual_best_mode_without_eval_repicks_from_training_loss(tmp_path):
    good, bad = make_tiny_llama(seed=1), make_tiny_llama(seed=2)
    with torch.no_grad():
        bad.lm_head.weight.mul_(30)
    trainer = MutualDistillationTrainer(
        [bad, good],
        _mutual_args(tmp_path, mutual_mode="best", exchange_steps=1, learning_rate=1e-4),
        train_dataset=Rows(),
    )
    assert trainer.best_index is None
    trainer.train()
    assert trainer.best_index == 1
