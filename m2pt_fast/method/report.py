"""How many parameters M²PT trains, by group."""
from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("vision prompts", "text prompts", "projector", "lm_head", "lora", "backbone")


@dataclass
class GroupCount:
    trainable: int = 0
    total: int = 0


@dataclass
class TrainableReport:
    groups: dict[str, GroupCount] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups.values())

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        rows = [f"{'group':<16}{'trainable':>16}{'total':>16}"]
        for name, g in self.groups.items():
            rows.append(f"{name:<16}{g.trainable:>16,}{g.total:>16,}")
        rows.append(f"{'all':<16}{self.trainable:>16,}{self.total:>16,}   ({self.percent:.4f}% trainable)")
        return "\n".join(rows)


def trainable_report(model) -> TrainableReport:
    """Trainable and total parameter counts of an M2PTLlava or M2PTQwenVL, by group (works on the meta
    device). The projector group is the interaction layer (the Qwen models' mergers).

    Under --method lora the projector group holds both PEFT's trained copy and the frozen original
    it keeps beside it; under --method full the decoder's parameters are the backbone's trainable ones."""
    projector = {id(p) for p in model.projector.parameters()}
    lm_head = {id(p) for p in model.lm_head.parameters()}
    report = TrainableReport({name: GroupCount() for name in GROUPS})
    for name, param in model.named_parameters():
        if param is model.vision_prompts:
            group = "vision prompts"
        elif param is model.text_prompts:
            group = "text prompts"
        elif id(param) in projector:
            group = "projector"
        elif id(param) in lm_head:
            group = "lm_head"
        elif ".lora_" in name:  # PEFT's LoRA matrices (--method lora)
            group = "lora"
        else:
            group = "backbone"
        count = param.numel()
        report.groups[group].total += count
        if param.requires_grad:
            report.groups[group].trainable += count
    # A quantized layer keeps its frozen weight in buffers (packed codes and statistics), which
    # named_parameters does not see: count the weight elements it represents.
    for module in model.modules():
        if hasattr(type(module), "logical_numel"):
            report.groups["backbone"].total += module.logical_numel
    return report
