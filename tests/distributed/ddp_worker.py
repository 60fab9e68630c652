"""One training run of the distributed tests (tests/distributed/test_ddp.py), in one or more processes.

Launch it with plain ``python`` (1 process) or, on a machine without a GPU, with::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 0 tests/distributed/ddp_worker.py --case distill --out DIR

(``accelerate launch --cpu --num_processes 2`` starts only one process: accelerate's CPU launcher needs
``mpirun``; ``--multi_gpu`` starts the processes with torchrun, and ``use_cpu=True`` in the training
arguments makes them a gloo group on the CPU.)

Cases: ``distill`` (online teacher, logit KL + hidden-state matching through the learned projection of a
narrower student), ``cached`` (top-k teacher cache), ``mutual`` (two students, deep mutual learning) and
``qlora`` (peft LoRA on a 4-bit RTN model, plain ``Trainer``). Every run uses fixed-length rows (no
padding), no dropout and ``--batch`` rows per process and step.

The main process writes to ``--out``: ``final.safetensors`` (every trainable tensor, the projections as
``projector.*``), ``log_history.json`` and ``setup.json`` (how the job ran); every process writes
``rank{i}.json`` (the dataset rows each optimizer step trained on, read from the student's inputs, and for
the mutual trainer the state its teacher picks read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny models

from conftest import make_tiny_llama  # noqa: E402

from hf_efficiency.distill import (  # noqa: E402
    DistillationTrainer,
    DistillationTrainingArguments,
    MutualDistillationTrainer,
    MutualDistillationTrainingArguments,
    cache_teacher_logprobs,
)

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
) * 4
N_ROWS = 16  # 4 rows per global step: 4 steps per epoch, so 5 steps cross an epoch boundary
LENGTH = 16
CASES = ("distill", "cached", "mutual", "qlora")
Q4 = {"quantization": {"method": "rtn", "bits": 4, "group_size": 32}}


class Rows(torch.utils.data.Dataset):
    """Distinct fixed-length byte-token rows, labels = input_ids."""

    def __init__(self, n: int = N_ROWS, length: int = LENGTH):
        ids = list(TEXT.encode())
        self.rows = [ids[9 * i : 9 * i + length] for i in range(n)]
        assert len({tuple(r) for r in self.rows}) == n

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.tensor(self.rows[i])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=CASES, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=2, help="rows per process and optimizer step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--save_steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--stop_after", type=int, default=0, help="stop training after this step (a killed run)")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    p.add_argument("--work", default=None, help="folder for the teacher cache / the saved float model")
    p.add_argument("--optim", default="adamw_torch")
    p.add_argument("--max_grad_norm", type=float, default=0.8)
    p.add_argument("--mode", choices=("dml", "best"), default="dml", help="mutual: mutual_mode")
    p.add_argument("--feature_weight", type=float, default=0.5, help="distill: weight of hidden-state matching")
    p.add_argument("--teacher_path", action="store_true", help="distill: pass the teacher as a saved folder")
    p.add_argument("--tie", action="store_true", help="distill: the student ties its embeddings")
    p.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage (needs deepspeed)")
    p.add_argument("--fsdp2", action="store_true", help="distill: shard the student with FSDP2 at load time")
    return p.parse_args(argv)


def deepspeed_config(stage: int) -> dict:
    """A DeepSpeed config whose "auto" values come from the training arguments; the optimizer is Trainer's."""
    return {
        # threshold 0: ZeRO-3 partitions even the tiny test model's parameters (the default keeps < 1e5 whole)
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def training_kwargs(a: argparse.Namespace) -> dict:
    extra = {"deepspeed": deepspeed_config(a.zero)} if a.zero is not None else {}
    return dict(
        **extra,
        output_dir=a.out,
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=2e-3,
        optim=a.optim,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=1,
        max_grad_norm=a.max_grad_norm,
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )


def narrow_student(tie: bool = False):
    """Narrower than the teacher (learned projections); untied embeddings unless ``tie`` (FSDP2: see the docs)."""
    return make_tiny_llama(seed=2, tie=tie, hidden_size=32, intermediate_size=64)


def build_distill(a: argparse.Namespace) -> DistillationTrainer:
    teacher = make_tiny_llama(seed=1, num_hidden_layers=4, initializer_range=0.2)
    args = DistillationTrainingArguments(
        **training_kwargs(a), alpha=0.5, temperature=2.0, feature_weight=a.feature_weight, feature_loss="mse"
    )
    if a.teacher_path:  # the trainer loads the teacher: after the training arguments (ZeRO-3: under zero.Init)
        path = Path(a.work) / "teacher"
        with args.main_process_first(desc="teacher"):
            if not (path / "config.json").is_file():
                teacher.save_pretrained(path)
        teacher = str(path)
    if a.fsdp2:
        # FSDP2 through transformers: the student is sharded with fully_shard when it is loaded
        from transformers import DistributedConfig

        path = Path(a.work) / ("student-tied" if a.tie else "student")
        with args.main_process_first(desc="student"):
            if not (path / "config.json").is_file():
                narrow_student(a.tie).save_pretrained(path)
        config = DistributedConfig(fsdp_size=args.world_size)
        student = AutoModelForCausalLM.from_pretrained(path, distributed_config=config)
    else:
        student = narrow_student(a.tie)
    return DistillationTrainer(model=student.train(), args=args, train_dataset=Rows(), teacher_model=teacher)


def build_cached(a: argparse.Namespace) -> DistillationTrainer:
    args = DistillationTrainingArguments(**training_kwargs(a), alpha=0.8, temperature=2.0)
    cache = Path(a.work) / "teacher_cache"
    with args.main_process_first(desc="teacher cache"):
        if not (cache / "teacher_cache.json").is_file():
            teacher = make_tiny_llama(seed=1, num_hidden_layers=4, initializer_range=0.2)
            cache_teacher_logprobs(teacher, Rows(), cache, top_k=8, shard_size=5, show_progress=False)
    args.teacher_cache_dir = str(cache)
    student = make_tiny_llama(seed=2, num_hidden_layers=2).train()
    return DistillationTrainer(model=student, args=args, train_dataset=Rows())


def build_mutual(a: argparse.Namespace) -> MutualDistillationTrainer:
    students = [make_tiny_llama(seed=1).train(), make_tiny_llama(seed=2, num_hidden_layers=3).train()]
    mode = {"mutual_mode": "best", "exchange_steps": 2} if a.mode == "best" else {"mutual_mode": "dml"}
    args = MutualDistillationTrainingArguments(**training_kwargs(a), mutual_weight=0.5, **mode)
    return MutualDistillationTrainer(students, args, train_dataset=Rows(), learning_rates=[2e-3, 1e-3])


def build_qlora(a: argparse.Namespace) -> Trainer:
    from peft import LoraConfig, get_peft_model

    from hf_efficiency.peft import prepare_model_for_kbit_training

    args = TrainingArguments(**training_kwargs(a))
    fp_dir = Path(a.work) / "tiny_fp"
    with args.main_process_first(desc="float model"):
        if not (fp_dir / "config.json").is_file():
            make_tiny_llama(seed=3, initializer_range=0.1).save_pretrained(fp_dir)
    base = AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config=Q4)
    model = prepare_model_for_kbit_training(base)  # gradient checkpointing on
    torch.manual_seed(0)  # LoRA's A: the same draw in every process and run
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return Trainer(model=get_peft_model(model, cfg), args=args, train_dataset=Rows())


class RecordRows(TrainerCallback):
    """Which dataset rows each optimizer step trained on in this process (from the student's inputs)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.index = {tuple(r): i for i, r in enumerate(Rows().rows)}
        self.steps: dict[int, list[int]] = {}
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training:
            step = self.trainer.state.global_step + 1
            self.steps.setdefault(step, []).extend(self.index[tuple(r)] for r in ids.tolist())


class RecordMutualState(TrainerCallback):
    """After every optimizer step: mode "best"'s teacher index and the running losses its next pick reads."""

    def __init__(self, trainer: MutualDistillationTrainer):
        self.trainer = trainer
        self.trajectory: list[list] = []

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        self.trajectory.append([state.global_step, t.best_index, t._train_ce.tolist(), t._train_n])


class StopAfter(TrainerCallback):
    """Ends training after step ``step``, like a process killed right after that step's checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor) or a ZeRO-3 partition (collectives), else ``t``."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone()
    return t


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the run: the model's (adapters only for peft) and the projections."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = {n: full(p).detach().float().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    projector = getattr(trainer, "projector", None)
    if projector is not None:
        out.update({f"projector.{k}": v.detach().float().contiguous().cpu() for k, v in projector.state_dict().items()})
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    trainer = {"distill": build_distill, "cached": build_cached, "mutual": build_mutual, "qlora": build_qlora}[a.case](
        a
    )
    recorder = RecordRows(trainer)
    trainer.add_callback(recorder)
    mutual = RecordMutualState(trainer) if isinstance(trainer, MutualDistillationTrainer) else None
    if mutual is not None:
        trainer.add_callback(mutual)
    if a.stop_after:
        trainer.add_callback(StopAfter(a.stop_after))
    trainer.train(resume_from_checkpoint=a.resume)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = trainer.args.process_index
    record = {"rows": {str(k): v for k, v in recorder.steps.items()}}
    if mutual is not None:
        record["mutual"] = mutual.trajectory
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    state = trainable_state(trainer)  # every process: gathering FSDP2 shards is a collective
    if trainer.is_world_process_zero():
        save_file(state, str(out / "final.safetensors"))
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        model = trainer.accelerator.unwrap_model(trainer.model)
        setup = {
            "world_size": trainer.args.world_size,
            "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
            "parameter": type(next(model.parameters())).__name__,  # DTensor: sharded by FSDP2
            "teacher": type(getattr(trainer, "teacher", None)).__name__,  # DeepSpeedEngine: ZeRO-3 teacher
        }
        (out / "setup.json").write_text(json.dumps(setup))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
