"""Training checkpoints that hold what trains, whatever the method: resumable with `train --resume`.

Trainer saves a checkpoint through the model's `save_pretrained`, which our own adapters (bottleneck) and
heads do not fit. `AdapterTrainer` saves the trainable parameters (adapter, head, and any extra state a
subclass adds) as one safetensors file beside Trainer's optimizer, scheduler and RNG state, and loads it back
on resume and for the best checkpoint of early stopping.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..faults import crash_point

TRAINABLE_WEIGHTS = "trainable_weights.safetensors"


class AdapterTrainer(Trainer):
    def extra_state(self) -> dict[str, torch.nn.Module]:
        """Modules trained beside the model that a checkpoint must keep (a subclass's own)."""
        return {}

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters() if p.requires_grad}
        for prefix, module in self.extra_state().items():
            state |= {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        return state

    def _restore(self, folder: str) -> bool:
        from safetensors.torch import load_file

        path = Path(folder) / TRAINABLE_WEIGHTS
        if not path.is_file():
            return False
        state = load_file(str(path))
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for prefix, module in self.extra_state().items():
                module.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
            for name, tensor in state.items():
                if name in own:
                    own[name].copy_(tensor.to(own[name].device, own[name].dtype))
        return True

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.is_fsdp_enabled:  # sharded weights: Trainer's own gathering path
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            from safetensors.torch import save_file

            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_file(self._trainable_state(), os.path.join(output_dir, TRAINABLE_WEIGHTS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._restore(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._restore(self.state.best_model_checkpoint):
            super()._load_best_model()


class CrashAfterCheckpoint(TrainerCallback):
    """Fault injection: `PEFT_ADAPT_CRASH_AT=checkpoint-N` kills the process once checkpoint N is written."""

    def on_save(self, args, state, control, **kwargs):
        crash_point(f"checkpoint-{state.global_step}")
