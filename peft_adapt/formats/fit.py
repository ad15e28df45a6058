"""Does an adapter's set of tensors fit a base: every adapted module exists there with the shapes it was trained on."""

from __future__ import annotations

import re

from ..models.fingerprint import layer_pattern
from .adapter_config import AdapterConfig

_LORA_TENSOR = re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


_HEAD_TENSOR = re.compile(r"^(?:.+\.)?(classifier|score|lm_head)(?:\.(?:modules_to_save|original_module)\.[^.]+)?\.(weight|bias)$")


_MLM_HEAD_TENSOR = re.compile(r"(?:^|\.)mlm_head\.")  # a domain adapter's masked-LM head (dense, norm, bias)


_WRAPPERS = ("base_model.model.",)


def base_module_shape(module_path: str, module_shapes: dict[str, dict]) -> list[int] | None:
    """[out, in] of the base layer an adapter names, matched by its longest known suffix: an adapter's path
    carries wrappers' prefixes (`base_model.model.`, our classifier's `encoder.`) the checkpoint does not."""
    parts = layer_pattern(module_path).split(".")
    for start in range(len(parts) - 1):
        suffix = ".".join(parts[start:])
        for pattern, entry in module_shapes.items():
            if pattern == suffix or pattern.endswith("." + suffix):
                return entry["shape"]
    return None


def _owning_layer(key: str, module_shapes: dict[str, dict]) -> tuple[str, list[int]] | None:
    """The longest leading part of a tensor's name that is a layer of the base, and that layer's [out, in]."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        shape = base_module_shape(path, module_shapes)
        if shape is not None:
            return path, shape
    return None


def adapter_fit_problems(shapes: dict[str, list[int]], fingerprint: dict, base_config: dict,
                         adapter_config: AdapterConfig | None) -> list[str]:
    """Why an adapter's tensors do not fit a base (empty when they do). LoRA matrices are checked exactly (A takes
    the layer's inputs, B gives its outputs); a prefix must match the layers and their width; any other adapter
    tensor must hang off a layer of the base and share one of its sizes. Heads are the adapter's own."""
    problems: dict[str, str] = {}  # one line per layer, however many of its tensors disagree
    modules = fingerprint["module_shapes"]
    matched = 0
    attached: dict[tuple[str, str], list] = {}  # (layer, part) -> [layer's shape, any tensor sharing a size with it]
    lora: dict[str, dict[str, list[int]]] = {}  # layer -> {"A": shape, "B": shape}
    for key, shape in sorted(shapes.items()):
        bare = next((key[len(w):] for w in _WRAPPERS if key.startswith(w)), key)
        if _HEAD_TENSOR.match(key) or _MLM_HEAD_TENSOR.search(key):
            continue
        matched += 1
        if m := _LORA_TENSOR.match(bare):
            lora.setdefault(m.group(1), {})[m.group(2)] = shape
        elif bare == "prompt_embeddings" and adapter_config is not None:
            problem = _prefix_problem(adapter_config.data, base_config)
            if problem:
                problems[bare] = problem
        else:
            owner = _owning_layer(bare, modules)
            if owner is None:
                problems.setdefault(bare, f"tensor {key!r} names no layer of the base")
                continue
            # a tensor hung on the layer (ia3_l), or one of a module inserted there (adapter.down): some tensor of
            # each must share a size with the layer
            part = bare[len(owner[0]) + 1:].split(".")[0]
            group = attached.setdefault((owner[0], part), [owner[1], False])
            group[1] = group[1] or bool(set(s for s in shape if s > 1) & set(owner[1])) or all(s <= 1 for s in shape)
    for path, pair in lora.items():
        problem = _lora_problem(path, pair, base_module_shape(path, modules))
        if problem:
            problems.setdefault(path, problem)
    for (layer, part), (layer_shape, fits) in attached.items():
        if not fits:
            problems.setdefault(layer, f"{layer}: the adapter's {part} shares no size with the base layer {layer_shape}")
    if not matched and not problems:
        problems["-"] = "no adapter weight names a layer of the base"
    return list(problems.values())


def _lora_problem(path: str, pair: dict[str, list[int]], base: list[int] | None) -> str | None:
    """Whether lora_A takes the layer's inputs and lora_B gives its outputs. A checkpoint stores a linear layer's
    weight [out, in] and a Conv1D's (GPT-2) [in, out]: a pair that fits either reading fits (the runtime checks the
    loaded layer itself)."""
    if base is None:
        return f"{path} is not a layer of the base"
    a, b = pair.get("A"), pair.get("B")
    for outputs, inputs in ((base[0], base[1]), (base[1], base[0])):
        if (a is None or a[-1] == inputs) and (b is None or b[0] == outputs):
            return None
    if a is not None and a[-1] not in base:
        return f"{path}: lora_A takes {a[-1]} inputs, the base layer has {base[1]}"
    return f"{path}: lora_B gives {b[0] if b else '?'} outputs, the base layer has {base[0]}"


def _prefix_problem(config: dict, base_config: dict) -> str | None:
    layers, width = config.get("num_layers"), config.get("token_dim")
    base_layers = base_config.get("num_hidden_layers", base_config.get("n_layer"))
    hidden = base_config.get("hidden_size", base_config.get("n_embd")) or 0
    heads = base_config.get("num_attention_heads", base_config.get("n_head")) or 1
    # keys and values are as wide as the hidden state, or narrower under grouped-query attention
    widths = {hidden, hidden // heads * (base_config.get("num_key_value_heads") or heads)}
    if layers != base_layers or width not in widths:
        return (f"the prefixes are for {layers} layers of width {width}, the base has {base_layers} layers of "
                f"width {' or '.join(map(str, sorted(widths)))}")
    return None
