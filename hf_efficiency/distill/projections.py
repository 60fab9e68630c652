"""Learned student-to-teacher projections for feature distillation, saved apart from the student."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .losses import uniform_layer_map

PROJECTIONS_WEIGHTS = "distill_projections.safetensors"
PROJECTIONS_CONFIG = "distill_projections.json"


def default_layer_map(student_config, num_teacher_layers: int) -> list[int]:
    """Teacher hidden-state index for each student layer (1..Ls): the teacher layers the student was copied
    from (``config.distilled_from_layers``, set by ``make_student``), else a uniform spread."""
    ls = int(student_config.num_hidden_layers)
    copied = getattr(student_config, "distilled_from_layers", None)
    if copied is not None and len(copied) == ls and max(copied) < num_teacher_layers:
        return [int(t) + 1 for t in copied]
    return uniform_layer_map(ls, num_teacher_layers)


class FeatureProjector(nn.Module):
    """One linear map per matched student layer from the student's width to the teacher's.

    With equal widths the maps start as the identity (and may be frozen with ``trainable=False``);
    otherwise they start as a scaled random orthogonal map. Student hidden-state index ``i`` (1-based:
    output of layer ``i``) is matched to teacher index ``layer_map[i - 1]``.
    """

    def __init__(self, student_width: int, teacher_width: int, layer_map: list[int], trainable: bool = True):
        super().__init__()
        self.student_width = int(student_width)
        self.teacher_width = int(teacher_width)
        self.layer_map = [int(t) for t in layer_map]
        self.maps = nn.ModuleList(nn.Linear(self.student_width, self.teacher_width, bias=False) for _ in self.layer_map)
        for m in self.maps:
            with torch.no_grad():
                if self.student_width == self.teacher_width:
                    m.weight.copy_(torch.eye(self.teacher_width))
                else:
                    nn.init.orthogonal_(m.weight)
            m.weight.requires_grad_(trainable)

    def forward(self, student_hidden: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, int]]:
        """``[(projected student layer i, teacher index)]`` for every matched layer."""
        if len(student_hidden) != len(self.layer_map) + 1:
            raise ValueError(
                f"Expected {len(self.layer_map) + 1} student hidden states (embeddings + "
                f"{len(self.layer_map)} layers), got {len(student_hidden)}"
            )
        return [
            (proj(student_hidden[i + 1].to(proj.weight.dtype)), t)
            for i, (proj, t) in enumerate(zip(self.maps, self.layer_map))
        ]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``distill_projections.safetensors`` and ``distill_projections.json`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
            str(folder / PROJECTIONS_WEIGHTS),
            metadata={"format": "pt"},
        )
        (folder / PROJECTIONS_CONFIG).write_text(
            json.dumps(
                {"student_width": self.student_width, "teacher_width": self.teacher_width, "layer_map": self.layer_map},
                indent=2,
            )
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> FeatureProjector:
        folder = Path(folder)
        cfg = json.loads((folder / PROJECTIONS_CONFIG).read_text())
        proj = cls(cfg["student_width"], cfg["teacher_width"], cfg["layer_map"])
        proj.load_state_dict(load_file(str(folder / PROJECTIONS_WEIGHTS)))
        return proj

    def load_from(self, folder: str | os.PathLike) -> bool:
        """Load weights saved in ``folder`` into this projector; False when ``folder`` has none."""
        path = Path(folder) / PROJECTIONS_WEIGHTS
        if not path.is_file():
            return False
        cfg = json.loads((Path(folder) / PROJECTIONS_CONFIG).read_text())
        if cfg["layer_map"] != self.layer_map or cfg["teacher_width"] != self.teacher_width:
            raise ValueError(
                f"Projections in {folder} map layers {cfg['layer_map']} to width "
                f"{cfg['teacher_width']}; this run maps {self.layer_map} to {self.teacher_width}"
            )
        state = load_file(str(path))
        self.load_state_dict({k: v.to(self.maps[0].weight.device) for k, v in state.items()})
        return True
