"""File names of the on-disk contract, and the one JSON reader and writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserInputError

MANIFEST = "manifest.json"


MANIFEST_VERSION = 2


ADAPTER_CONFIG = "adapter_config.json"  # peft's


ADAPTER_WEIGHTS = "adapter_model.safetensors"


PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")


TRAINED_WEIGHTS = "trained_weights.safetensors"  # what a freezing baseline saves instead of an adapter


OWN_CONFIG_SUFFIX = "_config.json"  # our own formats: `<method>_config.json` with a `method` key


# files that travel with an adapter besides its configs and weights (each checksummed in the manifest);
# anything else in a folder is left behind
EXTRA_FILES = ("metrics.json", "log_history.json", "loss_curve.png", "README.md", "signature.safetensors")


SIGNATURE_FILE = "signature.safetensors"  # routing's domain signature (routing.py): not a weight file


# peft types whose method is not simply the lower-cased type
PEFT_METHOD_NAMES = {"PREFIX_TUNING": "prefix"}


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
