"""What every adapter method provides: the protocol the other layers ask, and the weights it reads.

A method owns everything about itself: its recipe spec, injection for training, saving, reading a folder into
`AdapterWeights`, how its weights sit in the runtime's stacks (`StackComponent`), how adapters of it combine,
whether and how it folds into base weights, and how a fresh model loads it for evaluation. The runtime,
registry, loading, training, merge and export ask these; none of them branches on a method's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from ..errors import UserInputError

# peft's task type for ours, where peft's wrapper is the model (a classifier's head is ours: no task type)
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}

# where a stacked component acts at a site: on the layer's input, as a delta added from its input, on its output
INPUT, DELTA, OUTPUT = "input", "delta", "output"


# an adapter's task head beside its sites: a classifier's linear layer (`classifier.weight`, `.bias`, kept as `weight`
# and `bias`) and a token classifier's CRF transitions (`crf.start`, `crf.end`, `crf.transitions`, kept as they are)
_HEAD_KEY = re.compile(r"^(?:classifier(?:\.modules_to_save\.[^.]+)?\.(weight|bias)|(crf)(?:\.modules_to_save\.[^.]+)?\.(start|end|transitions))$")


def head_name(key: str) -> str | None:
    """The head entry a saved key holds (`weight`, `bias`, `crf.start`, ...), or None for a key of no head."""
    m = _HEAD_KEY.match(key)
    if m is None:
        return None
    return m.group(1) or f"crf.{m.group(3)}"


def head_state(head: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A head's entries under the keys a saved adapter uses, after `prefix` (peft's `base_model.model.`)."""
    return {prefix + (k if k.startswith("crf.") else f"classifier.{k}"): v.contiguous() for k, v in head.items()}


def head_modules(head: dict[str, torch.Tensor]) -> list[str]:
    """The modules a head's entries belong to (peft's `modules_to_save`)."""
    return ["classifier"] + (["crf"] if any(k.startswith("crf.") for k in head) else []) if head else []


@dataclass
class AdapterWeights:
    """One adapter read into memory: per adapted site (a module path of the base), the method's own tensors."""

    method: str
    sites: dict[str, object]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # the task head, if any (`head_name`)
    extent: int = 1  # how far the runtime's stacks must reach for it (LoRA: its rank; bottleneck: its size)
    config: dict = field(default_factory=dict)  # what else the method needs to run or write it

    @property
    def nbytes(self) -> int:
        def size(value) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, (tuple, list)):
                return sum(size(v) for v in value)
            return 0

        return sum(size(v) for v in self.sites.values()) + sum(size(t) for t in self.head.values())


class StackComponent(nn.Module):
    """One method's resident adapters at one site of the runtime's model, stacked over slots (slot 0: no adapter).

    A row whose slot holds another method (or none) must come out unchanged: zeros for what is added, ones for what
    scales. `extent` is the batch's reach for this method (0: no row uses it, so the component is skipped).
    """

    stage: ClassVar[str] = DELTA

    def resize(self, capacity: int) -> None:
        raise NotImplementedError

    def write(self, slot: int, site: object) -> None:
        raise NotImplementedError

    def clear(self, slot: int) -> None:
        raise NotImplementedError

    def apply(self, tensor: torch.Tensor, batch) -> torch.Tensor:
        """INPUT: the layer's input as adapted; DELTA: what to add to the output, from the input; OUTPUT: the output
        as adapted."""
        raise NotImplementedError


def gathered(stack: torch.Tensor, batch) -> torch.Tensor:
    """Each row's slice of a [slots, ...] stack: one slot for every row, or gathered per row."""
    return stack[batch.single].unsqueeze(0) if batch.single is not None else stack.index_select(0, batch.slots)


class AdapterMethod:
    """The protocol, with what a method that cannot do something says instead."""

    name: ClassVar[str]
    spec: ClassVar[type[BaseModel]]
    stacked: ClassVar[bool] = True  # False: its rows run through `group_model`, one group per adapter
    stackable: ClassVar[bool] = False  # True: adapters of it stack (domain under task) by adding their deltas
    tasks: ClassVar[tuple[str, ...]] = ("causal_lm", "classification", "token_classification", "masked_lm")
    fold_reason: ClassVar[str | None] = None  # why it cannot be folded into base weights; None if it can
    delta_merges: ClassVar[bool] = False  # True: each site is a weight delta (`site_delta`), so every merge method applies
    vllm_servable: ClassVar[bool] = False  # True: `vllm_folder` writes a folder vLLM serves
    low_rank: ClassVar[bool] = False  # True: each site is B·A (`factors`), what llama.cpp's `--lora` applies

    # ---- training
    def inject(self, model: nn.Module, spec, task: str, head_modules: list[str], model_type: str | None) -> nn.Module:
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path) -> None:
        raise NotImplementedError

    def peft_loadable(self, task: str) -> bool:
        """Whether plain peft loads its folder for `task` (the model card says how)."""
        return False

    def load_for_eval(self, model: nn.Module, folder: Path) -> nn.Module:
        """A freshly loaded base with this adapter applied, for evaluation."""
        raise NotImplementedError

    # ---- reading and serving
    def read(self, folder: Path, strip_prefix: str = "") -> AdapterWeights:
        raise NotImplementedError

    def component(self, site: object, base_layer: nn.Module, capacity: int, dtype, device) -> StackComponent:
        """The stack this method's weights at one site live in (created on first use of the site)."""
        raise NotImplementedError

    def check_site(self, path: str, site: object, base_layer: nn.Module) -> None:
        """Refuse weights that do not fit the base layer at `path` (before anything is written)."""

    def group_model(self, weights: AdapterWeights, model: nn.Module):
        """Not stacked: a model that runs this adapter's rows around the shared base."""
        raise NotImplementedError

    # ---- combining, folding, writing
    def combine(self, parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
        """sum_i w_i * adapter_i as one adapter of this method (exact where the method is linear in its weights)."""
        raise UserInputError(f"{self.name} adapters cannot be combined")

    def stack(self, parts: list[AdapterWeights]) -> AdapterWeights:
        """Adapters stacked bottom first (domain adapters under a task adapter) as one adapter of this method."""
        raise UserInputError(f"{self.name} adapters cannot be stacked; only LoRA adapters stack (their deltas add)")

    def fold(self, state: dict[str, torch.Tensor], path: str, site: object) -> None:
        """Fold this site's adaptation into the base layer `path` of a state dict (its weight, and bias if it has one)."""
        raise UserInputError(f"a {self.name} adapter cannot be folded into base weights: {self.fold_reason}")

    def write(self, weights: AdapterWeights, folder: Path, template: dict) -> None:
        """Save weights (a merge's result) as a folder of this method's format; `template`: a parent's config."""
        raise NotImplementedError

    # ---- merging by deltas, stacking under a task adapter, export for other servers
    def site_delta(self, site: object) -> torch.Tensor:
        """The weight delta [out, in] one site adds (methods with `delta_merges`)."""
        raise UserInputError(f"{self.name} adapters are no weight deltas; they combine by linear averaging only")

    def from_deltas(self, deltas: dict[str, torch.Tensor], rank: int, head: dict) -> tuple[AdapterWeights, dict]:
        """Merged per-site deltas back as an adapter of this method, and what re-compressing them lost."""
        raise UserInputError(f"{self.name} adapters are no weight deltas; they combine by linear averaging only")

    def add_frozen(self, model: nn.Module, weights: AdapterWeights, prefix: str) -> None:
        """Add these weights' deltas to their base layers' outputs (forward hooks), frozen: a domain adapter under a
        task adapter being trained or evaluated (methods that are `stackable`)."""
        raise UserInputError(f"{self.name} adapters cannot be stacked; only LoRA adapters stack (their deltas add)")

    def vllm_folder(self, folder: Path, out: Path, pad_rank: bool) -> list[str]:
        """Write `folder` as one vLLM serves (methods that are `vllm_servable`); returns warnings."""
        raise UserInputError(f"vLLM serves LoRA adapters, not {self.name} ones")

    def factors(self, site) -> tuple[torch.Tensor, torch.Tensor]:
        """A site's delta as (A [r, in], B [out, r]), its scaling in B (methods that are `low_rank`)."""
        raise UserInputError(f"{self.name} adapters are not low-rank factors B·A")


def weighted_average(parts: list[tuple[AdapterWeights, float]], what: str) -> AdapterWeights:
    """The same-shaped tensors of several adapters, weighted and summed (site by site, head included)."""
    first = parts[0][0]
    for weights, _ in parts[1:]:
        if set(weights.sites) != set(first.sites) or any(
                _shapes(weights.sites[p]) != _shapes(first.sites[p]) for p in first.sites):
            raise UserInputError(f"{what} adapters of other sites or sizes cannot be averaged; only adapters of one shape")

    coefficients = [w for _, w in parts]

    def mix(values, weights):
        if isinstance(values[0], torch.Tensor):
            return sum(v.float() * w for v, w in zip(values, weights))
        if isinstance(values[0], (tuple, list)):
            return type(values[0])(mix([v[i] for v in values], weights) for i in range(len(values[0])))
        return values[0]  # a setting (an activation's name): the first's

    sites = {p: mix([w.sites[p] for w, _ in parts], coefficients) for p in first.sites}
    return AdapterWeights(first.method, sites, average_heads([w.head for w, _ in parts], coefficients), first.extent,
                          dict(first.config))


def average_heads(heads: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Classification heads mixed like their adapters, the weights normalised to sum to 1 (weights 1, 0: the first)."""
    if not any(heads):
        return {}
    if not all(heads):
        raise UserInputError("a classification adapter can be combined only with other classification adapters")
    total = sum(weights)
    if total == 0:
        raise UserInputError("the weights of combined classifiers sum to 0; their heads cannot be averaged")
    return {k: sum(h[k].float() * (w / total) for h, w in zip(heads, weights)) for k in heads[0]}


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    return value


class PeftTrainedMethod(AdapterMethod):
    """A method trained through peft: peft saves its folder, and plain peft loads it back for evaluation."""

    def save(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    def peft_loadable(self, task: str) -> bool:
        return True

    def load_for_eval(self, model: nn.Module, folder: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, folder, is_trainable=False)
