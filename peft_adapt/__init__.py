"""peft_adapt: parameter-efficient domain adapters on quantized backbones."""

import logging
import warnings

__version__ = "0.1.0"

# bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face hub at import and warns
# when it cannot; it falls back to its own kernel, so the warning only adds noise offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
