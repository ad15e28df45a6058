"""`peft-adapt serve`: load the base once, load (and pin) the operator's adapters, run uvicorn."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from ..models.backbone import resolve_model_path
from ..registry.refs import is_folder_ref
from ..registry.store import Registry
from ..runtime import AdapterRuntime
from .app import create_app
from .connections import ConnectionLimits, guarded_protocol, raise_open_file_limit
from .public import public_base_name
from .schemas import ServerSettings


def serve(base: str, quantization: str = "nf4", registry_root=None, adapters: list[str] | None = None,
          host: str = "127.0.0.1", port: int = 8000, task: str = "auto", max_adapters: int | None = None,
          settings: ServerSettings | None = None) -> None:
    import uvicorn


    settings = settings or ServerSettings(base_name=public_base_name(base))
    registry = registry_root if isinstance(registry_root, Registry) else Registry(registry_root)
    from_folders = check_served_folders(adapters, base)
    runtime = AdapterRuntime(base, task=_task_of(base) if task == "auto" else task, quantization=quantization,
                             registry=registry, max_adapters=max_adapters, batch_invariant=settings.batch_invariant)
    for name in adapters or []:
        runtime.load(name, pin=True)
    app = create_app(runtime, registry, settings, from_folders)
    limits = ConnectionLimits(settings.header_timeout_s, settings.body_timeout_s, settings.keep_alive_s,
                              settings.max_connections, settings.max_connections_per_peer)
    raise_open_file_limit(limits.max_connections + 256)  # the caps, not the descriptor limit, refuse clients
    uvicorn.run(app, host=host, port=port, log_level="warning", http=guarded_protocol(limits),
                timeout_keep_alive=limits.keep_alive_s)


def _task_of(base: str) -> str:
    """seq2seq for an encoder-decoder, causal_lm for a model with a language-modelling head, classification for a
    bare encoder."""
    from transformers import AutoConfig


    config = AutoConfig.from_pretrained(resolve_model_path(base))
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = " ".join(config.architectures or [])
    return "causal_lm" if "CausalLM" in architectures or "LMHead" in architectures else "classification"


def check_served_folders(adapters: list[str] | None, base: str) -> set[str]:
    """The adapters named as folders, each with the manifest training wrote: nothing unchecked is served."""

    folders = {name for name in adapters or [] if is_folder_ref(name)}
    for name in folders:
        if not (Path(name).expanduser() / "manifest.json").is_file():
            raise UserInputError(f"{name}: a folder without manifest.json cannot be served unchecked; register it "
                                 f"first (peft-adapt registry import {name} --base {base})")
    return folders
