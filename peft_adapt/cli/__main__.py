"""`python -m peft_adapt.cli`: the same as the `peft-adapt` command."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
