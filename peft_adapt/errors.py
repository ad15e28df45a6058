"""Errors meant for people: each names the input, what was expected, what was found, and the fix."""


class UserInputError(Exception):
    """Bad input from the user (a recipe, a data file, a model name). The CLI prints it and exits 2."""
