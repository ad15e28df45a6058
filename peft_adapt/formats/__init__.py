"""The on-disk contract, read and written in this one package: the manifest, the adapter configs, the checks a folder
passes before anything trusts it, and the one atomic folder writer.

An adapter folder holds an adapter config (peft's `adapter_config.json`, or our own `<method>_config.json` for
methods peft lacks), safetensors weights, `manifest.json`, and what travels with them (EXTRA_FILES). It is
accepted when its config parses, every weight file is complete, and every checksum in the manifest matches.
Pickle weights are refused unless the caller passes `allow_pickle=True`; then they are read as tensors only
and converted to safetensors on the way in.
"""

from .adapter_config import AdapterConfig, folder_kind, own_config_files, read_adapter_config
from .files import (
    adapter_files_to_copy,
    check_output_folder,
    check_safetensors,
    check_signature_file,
    convert_pickle_to_safetensors,
    fsync_dir,
    fsync_tree,
    is_adapter_file,
    load_pickle_weights,
    publish,
    staged_folder,
    tensor_shapes,
    weight_files,
)
from .fit import adapter_fit_problems, base_module_shape
from .manifest import (
    Manifest,
    build_manifest,
    file_checksums,
    library_versions,
    read_manifest,
    verify_checksums,
    write_manifest,
)
from .names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXTRA_FILES,
    MANIFEST,
    MANIFEST_VERSION,
    OWN_CONFIG_SUFFIX,
    PEFT_METHOD_NAMES,
    PICKLE_WEIGHTS,
    SIGNATURE_FILE,
    TRAINED_WEIGHTS,
    read_json,
    write_json,
)

__all__ = [
    "AdapterConfig", "folder_kind", "own_config_files", "read_adapter_config", "adapter_files_to_copy",
    "check_safetensors", "convert_pickle_to_safetensors", "fsync_dir", "fsync_tree", "is_adapter_file",
    "load_pickle_weights", "publish", "check_output_folder", "check_signature_file", "staged_folder", "tensor_shapes", "weight_files", "adapter_fit_problems",
    "base_module_shape", "Manifest", "build_manifest", "file_checksums", "library_versions", "read_manifest",
    "verify_checksums", "write_manifest", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "EXTRA_FILES", "MANIFEST",
    "MANIFEST_VERSION", "OWN_CONFIG_SUFFIX", "PEFT_METHOD_NAMES", "PICKLE_WEIGHTS", "SIGNATURE_FILE",
    "TRAINED_WEIGHTS", "read_json", "write_json",
]
