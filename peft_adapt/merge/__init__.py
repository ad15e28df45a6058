"""Adapter + adapter (`combine.py`, methods in `methods.py`) and adapter into base (`export.py`)."""

from .combine import METHODS, combine_adapters, merge_deltas
from .export import export_adapter_folder, export_model

__all__ = ["METHODS", "combine_adapters", "merge_deltas", "export_adapter_folder", "export_model"]
