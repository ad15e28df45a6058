"""Adapter + adapter (`combine.py`, methods in `methods.py`) and adapter into base (`export.py`)."""

from .combine import METHODS, combine_adapters, merge_lora
from .export import export_adapter_folder, export_model

__all__ = ["METHODS", "combine_adapters", "merge_lora", "export_adapter_folder", "export_model"]
