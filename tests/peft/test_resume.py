"""Resuming the stock ``Trainer`` on a model quantized by hf-efficiency is exact: QLoRA (peft's LoRA on our
4-bit ``QuantLinear``, the docs' recipe with ``prepare_model_for_kbit_training``) and our own peft methods
on a 4-bit base. A run killed right after its step-k checkpoint and resumed by a new trainer with a newly
built model ends with bit-identical weights, the packed base included.

The setup follows tests/distill/test_resume.py: shuffled data, gradient accumulation 2 with a short last
accumulation per epoch, AdamW, warmup + cosine, clipping, a kill (an exception from ``on_save``) in the
middle of the first epoch and an epoch boundary after it. LoRA dropout is on here, with gradient
checkpointing (enabled by ``prepare_model_for_kbit_training``): the resumed run must also restore the RNG.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model
from resume_kit import KILL_AT, STEPS, KillAfterSave, Killed, Rows, assert_same_tensors, training_args
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_efficiency.peft import prepare_model_for_kbit_training

Q4 = {"quantization": {"bits": 4, "group_size": 32}}


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_fp")
    make_tiny_llama(seed=3, initializer_range=0.1).save_pretrained(path)
    return str(path)


def trainer_for(model, out: str) -> Trainer:
    args = TrainingArguments(**training_args(out, learning_rate=5e-3))
    return Trainer(model=model, args=args, train_dataset=Rows())


def run_interrupted(build, tmp_path):
    """Final state dicts of an uninterrupted run and of a run killed after its step-KILL_AT checkpoint and
    resumed by a new trainer over a newly built model."""
    full = trainer_for(build(), str(tmp_path / "full"))
    full.train()
    killed = trainer_for(build(), str(tmp_path / "killed"))
    killed.add_callback(KillAfterSave(KILL_AT))
    with pytest.raises(Killed):
        killed.train()
    ckpt = str(tmp_path / "killed" / f"checkpoint-{KILL_AT}")
    resumed = trainer_for(build(), str(tmp_path / "killed"))
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.state.global_step == full.state.global_step == STEPS
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (full, resumed)]
    assert losses[1] == losses[0]  # the checkpoint carries the log history of the first KILL_AT steps
    return full.model.state_dict(), resumed.model.state_dict(), ckpt


def test_qlora_resume_is_exact(fp_dir, tmp_path):
    def build():
        torch.manual_seed(0)  # LoRA's A is drawn here: the full and the killed run start from the same init
        base = AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config=Q4)
        model = prepare_model_for_kbit_training(base)  # gradient checkpointing on
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)

    full, resumed, ckpt = run_interrupted(build, tmp_path)
    assert os.path.isfile(os.path.join(ckpt, "adapter_model.safetensors"))
    assert_same_tensors(resumed, full)
    assert any(".lora_A." in k for k in full)


@pytest.mark.parametrize("spec", [{"method": "adapters", "adapter_size": 8}, {"method": "bitfit"}])
def test_peft_method_on_a_4bit_base_resume_is_exact(fp_dir, tmp_path, spec):
    def build():
        torch.manual_seed(0)  # the adapters are drawn here: the full and the killed run start from the same init
        return AutoModelForCausalLM.from_pretrained(fp_dir, efficiency_config={**Q4, "peft": spec})

    full, resumed, ckpt = run_interrupted(build, tmp_path)
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    assert any(v.dtype in (torch.uint8, torch.int8, torch.int32) for v in saved.values())  # the packed base
    assert_same_tensors(resumed, full)
