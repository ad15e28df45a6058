"""peft_adapt: parameter-efficient domain adapters on quantized backbones.

The public API: what a library user imports. Names load on first use (PEP 562), so `import peft_adapt` stays
cheap and pulls no torch until a name that needs it is used.

    from peft_adapt import Registry, AdapterRuntime, load_recipe, train_recipe
"""

from __future__ import annotations

import importlib
import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face hub at import and warns
# when it cannot; it falls back to its own kernel, so the warning only adds noise offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")

# public name -> the module that defines it
_EXPORTS = {
    # errors
    "UserInputError": "errors",
    # the registry, and the one grammar of adapter references
    "Registry": "registry.store",
    "AdapterEntry": "registry.store",
    "parse_ref": "registry.refs",
    "resolve": "registry.refs",
    # serving many adapters on one base
    "AdapterRuntime": "runtime.runtime",
    # recipes and training
    "Recipe": "training.recipe",
    "load_recipe": "training.recipe",
    "parse_recipe": "training.recipe",
    "train_recipe": "training.domain",
    "train_domain": "training.domain",
    "TrainResult": "training.domain",
    # combining adapters, and export
    "combine_adapters": "merge.combine",
    "export_model": "merge.export",
    "export_adapter_folder": "merge.export",
    # the HTTP server
    "create_app": "server.app",
    "ServerSettings": "server.schemas",
    # methods and domain adaptation: their tables
    "adapter_methods": "methods",
    "adaptation_methods": "adaptation",
}
_ALIASES = {"adapter_methods": "TABLE", "adaptation_methods": "TABLE"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peft_adapt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _ALIASES.get(name, name))
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
