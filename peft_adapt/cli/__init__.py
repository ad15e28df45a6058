"""The `peft-adapt` command: a parser built from one small function per verb, each calling the library."""
