"""Errors meant for people: each names the input, what was expected, what was found, and the fix."""


class UserInputError(Exception):
    """Bad input from the user (a recipe, a data file, a model name). The CLI prints it and exits 2.

    `public`: the message a remote client (an HTTP request) may read, where the full one names what only the
    operator should see (the registry's location, its other adapters, files on the server)."""

    def __init__(self, message: str = "", public: str | None = None):
        super().__init__(message)
        self.public = public if public is not None else message


class ServiceUnavailable(UserInputError):
    """A service this command depends on (the registry's database or object store) cannot be reached: not the
    input's fault. The server answers 503 with Retry-After and `public`; the CLI prints one line."""
