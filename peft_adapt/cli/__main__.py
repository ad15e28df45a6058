"""`python -m peft_adapt.cli`: the same as the `peft-adapt` command."""

from .main import main

if __name__ == "__main__":
    main()
