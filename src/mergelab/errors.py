"""The one exception type a user can cause."""


class MergeError(Exception):
    """A problem with the user's input: a path, tensor, parameter or config.

    The message names the file, tensor or parameter at fault and says how to fix it.
    The CLI prints it as ``error: ...`` without a traceback and exits with status 2.
    """
