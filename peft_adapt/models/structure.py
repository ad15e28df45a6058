"""Where a transformer's parts are, read from its modules rather than from a list of model types: the blocks (its
longest list of identical layers), and in each block the attention sublayer (the first child holding linear layers)
and the feed-forward one (the last), each with its output projection: of its linear layers that give the model's
width, the last registered (Llama's q_proj gives it too, but o_proj comes after it). A new architecture gets default
adapter sites without a list entry. Mixture-of-experts blocks are not read this way (their last linear layer is one
expert's): name their modules."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class Roles:
    attention_inputs: list[str] = field(default_factory=list)  # projections attention reads (q, k, v or fused)
    attention_outputs: list[str] = field(default_factory=list)  # one per block
    ffn_outputs: list[str] = field(default_factory=list)  # one per block


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))  # bitsandbytes' 4-bit and 8-bit layers are nn.Linear


def _linear_leaves(prefix: str, module: nn.Module) -> list[str]:
    if is_linear(module):
        return [prefix]
    return [f"{prefix}.{name}" for name, child in module.named_modules() if name and is_linear(child)]


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The longest ModuleList of layers of one class that hold linear layers: the model's blocks."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            children = list(module)
            if children and len({type(c) for c in children}) == 1 and _linear_leaves("", children[0]):
                best = [(f"{name}.{i}", child) for i, child in enumerate(children)]
    return best


def layer_features(layer: nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a linear layer: nn.Linear and its quantized subclasses, or GPT-2's Conv1D (which stores
    its weight [in, out]); None for anything else."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return None


def _outputs(module: nn.Module) -> int | None:
    features = layer_features(module)
    return features[1] if features else None


def block_roles(model: nn.Module) -> Roles | None:
    """The attention and feed-forward projections of every block; None when a block has no two such sublayers."""
    roles = Roles()
    blocks = transformer_blocks(model)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if not blocks:
        return None
    for path, block in blocks:
        parts = [_linear_leaves(f"{path}.{name}", child) for name, child in block.named_children()]
        parts = [p for p in parts if p]
        if len(parts) < 2:
            return None
        attention, ffn = parts[0], parts[-1]

        def output_of(paths: list[str]) -> str:
            giving_width = [p for p in paths if width is None or _outputs(model.get_submodule(p)) == width]
            return (giving_width or paths)[-1]

        out = output_of(attention)
        roles.attention_inputs += [p for p in attention if p != out] or attention
        roles.attention_outputs.append(out)
        roles.ffn_outputs.append(output_of(ffn))
    return roles
