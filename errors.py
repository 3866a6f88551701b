"""The one exception base that every layer's user-facing errors derive from.

A `ReplfsError` carries a message that says what is wrong and what to do; the `replfs`
command prints it (no traceback) and exits with `exit_code`.
"""


class ReplfsError(Exception):
    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
