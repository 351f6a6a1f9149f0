"""The one exception type a user can cause."""


class MergelabError(Exception):
    """A problem with the user's input: a path, tensor, parameter, config or data file.

    The message names the file, tensor or parameter at fault and says how to fix it: one
    line, optionally followed by an indented hint. The CLI prints it as ``error: ...``
    without a traceback and exits with status 2.
    """


# The name of version 1, when every user error came from merging. Kept so that existing
# ``except MergeError`` clauses keep working.
MergeError = MergelabError
