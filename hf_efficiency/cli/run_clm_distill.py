#!/usr/bin/env python
"""Distill a causal language model, the transformers ``run_clm.py`` way, with ``DistillationTrainer``.

Everything is a command-line flag of ``HfArgumentParser`` (or a JSON file as the single argument):
``ModelArguments`` (student), ``DataTrainingArguments`` (text) and ``DistillationTrainingArguments``
(every ``TrainingArguments`` flag plus the teacher and the distillation losses). Examples::

    python integrations/run_clm_distill.py --teacher_model_name_or_path bundled --student_num_layers 10 \\
        --dataset_name kjv --block_size 128 --max_steps 200 --output_dir out/distill \\
        --do_train --do_eval --alpha 0.5 --distill_loss forward_kl

    # offline teacher: cache top-k log-probs once, then train without the teacher in memory
    python integrations/run_clm_distill.py ... --teacher_cache_dir out/teacher_cache

Without ``--model_name_or_path`` the student is built from the teacher with ``make_student``
(``--student_num_layers`` layers, ``--student_layer_strategy``). ``--dataset_name kjv`` uses the bundled
King James Bible (train: passages 0-18581, validation: the evaluation slice); any other name goes to
``datasets.load_dataset``.

The file lives in the CLI package because it imports the demo data (bundled teacher, KJV):
``integrations/run_clm_distill.py`` is a link to it and ``hf-efficiency distill`` calls its `main`.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_efficiency.demo import KJV_SPLITS, kjv_passages, resolve_model_path
from hf_efficiency.distill import DistillationTrainer, DistillationTrainingArguments, make_student
from hf_efficiency.distill.teacher_cache import CACHE_INDEX, cache_teacher_logprobs
from hf_efficiency.distill.trainer import load_teacher

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The student."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Student checkpoint; default: built from the teacher by make_student."}
    )
    student_num_layers: int | None = field(
        default=None, metadata={"help": "Layers of a student built from the teacher (default: a third)."}
    )
    student_layer_strategy: str = field(
        default="uniform",
        metadata={"help": "Which teacher layers seed the student: uniform, every_other, first, last."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: teacher's)."})
    dtype: str = field(default="auto", metadata={"help": "Student dtype: auto, float32, bfloat16, float16."})


@dataclass
class DataTrainingArguments:
    """The text."""

    dataset_name: str | None = field(default="kjv", metadata={"help": "'kjv' or a datasets Hub name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "datasets config name."})
    train_file: str | None = field(default=None, metadata={"help": "A .txt/.json/.csv training file."})
    validation_file: str | None = field(default=None, metadata={"help": "A .txt/.json/.csv validation file."})
    text_column_name: str = field(default="text", metadata={"help": "Column holding the text."})
    block_size: int = field(
        default=256, metadata={"help": "Tokens per training row (texts are concatenated and split)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation rows."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Held-out share when the dataset has no validation split."}
    )
    cache_teacher_top_k: int = field(
        default=32, metadata={"help": "Top-k log-probs kept per position in --teacher_cache_dir."}
    )
    cache_teacher_only: bool = field(default=False, metadata={"help": "Build the teacher cache and exit."})


def load_raw_text(data_args: DataTrainingArguments) -> Any:
    """A ``DatasetDict`` with ``train`` and ``validation`` splits of raw text."""
    import datasets

    if data_args.train_file is None and (data_args.dataset_name or "").lower() == "kjv":
        passages = kjv_passages()
        lo, hi = KJV_SPLITS["evaluation"]
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({data_args.text_column_name: passages[:lo]}),
                "validation": datasets.Dataset.from_dict({data_args.text_column_name: passages[lo:hi]}),
            }
        )
    if data_args.train_file is not None:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        ext = data_args.train_file.rsplit(".", 1)[-1]
        raw = datasets.load_dataset("text" if ext == "txt" else ext, data_files=files)
    else:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    if "validation" not in raw:
        pct = data_args.validation_split_percentage
        name, cfg = data_args.dataset_name, data_args.dataset_config_name
        if data_args.train_file is not None:
            base = raw["train"]
            split = base.train_test_split(test_size=pct / 100, seed=0, shuffle=False)
            raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
        else:
            raw = datasets.DatasetDict(
                {
                    "train": datasets.load_dataset(name, cfg, split=f"train[{pct}%:]"),
                    "validation": datasets.load_dataset(name, cfg, split=f"train[:{pct}%]"),
                }
            )
    return raw


def tokenize_and_group(
    raw: Any, tokenizer: Any, data_args: DataTrainingArguments, training_args: DistillationTrainingArguments
) -> Any:
    """Tokenize, concatenate and split into ``block_size`` rows with ``labels = input_ids`` (run_clm.py)."""
    column = data_args.text_column_name
    block = data_args.block_size

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # one newline between documents keeps line structure when rows are concatenated
        return tokenizer([t + "\n" for t in batch[column]], add_special_tokens=False)

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = {k: list(chain(*batch[k])) for k in batch}
        total = (len(joined["input_ids"]) // block) * block
        out = {k: [v[i : i + block] for i in range(0, total, block)] for k, v in joined.items()}
        out["labels"] = [list(x) for x in out["input_ids"]]
        return out

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")
        return tokenized.map(group, batched=True, batch_size=1000, desc=f"Grouping into blocks of {block}")


def _dtype(name: str) -> Any:
    return "auto" if name == "auto" else getattr(torch, name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the script with ``argv`` (default: ``sys.argv[1:]``); returns the train/eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DistillationTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    teacher_path = training_args.teacher_model_name_or_path
    teacher_path = resolve_model_path(teacher_path) if teacher_path else None
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or teacher_path or model_args.model_name_or_path
    )

    raw = load_raw_text(data_args)
    lm_data = tokenize_and_group(raw, tokenizer, data_args, training_args)
    train_dataset, eval_dataset = lm_data["train"], lm_data["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

    cache_dir = training_args.teacher_cache_dir
    need_cache = bool(cache_dir) and not os.path.isfile(os.path.join(cache_dir, CACHE_INDEX))
    teacher, teacher_tokenizer = None, None
    if teacher_path and (not cache_dir or need_cache or model_args.model_name_or_path is None):
        teacher, teacher_tokenizer = load_teacher(teacher_path, training_args)
    if model_args.model_name_or_path is not None:
        student = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=_dtype(model_args.dtype))
    else:
        if teacher is None:
            raise ValueError(
                "Pass --model_name_or_path (the student) or --teacher_model_name_or_path to build "
                "the student from the teacher"
            )
        layers = model_args.student_num_layers or max(1, round(teacher.config.num_hidden_layers / 3))
        student = make_student(
            teacher,
            layers,
            strategy=model_args.student_layer_strategy,
            dtype=None if model_args.dtype == "auto" else _dtype(model_args.dtype),
        )
        logger.info(
            "Student: %d of the teacher's %d layers (%s)",
            layers,
            teacher.config.num_hidden_layers,
            student.config.distilled_from_layers,
        )

    if need_cache:
        with training_args.main_process_first(desc="caching the teacher"):
            if not os.path.isfile(os.path.join(cache_dir, CACHE_INDEX)):
                cache_teacher_logprobs(
                    teacher.to(training_args.device),
                    train_dataset,
                    cache_dir,
                    top_k=data_args.cache_teacher_top_k,
                    batch_size=training_args.per_device_eval_batch_size,
                    teacher_name=teacher_path,
                )
    if data_args.cache_teacher_only:
        return {"teacher_cache_dir": cache_dir}
    if cache_dir:
        teacher = None
        gc.collect()

    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        teacher_model=None if cache_dir else (teacher if teacher is not None else teacher_path),
        teacher_processing_class=None if cache_dir else teacher_tokenizer,
    )
    metrics: dict[str, Any] = {}
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        train_metrics = dict(result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        eval_metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


if __name__ == "__main__":
    main()
