"""The one exception type that means "the user's input is wrong"."""


class RlcdError(Exception):
    """A problem with the user's input or environment.

    The CLI prints it as a single ``rlcd-data: error: ...`` line and exits
    with status 2, without a traceback. The message must name the problem
    (file and line, variable, task, column) and, where useful, the fix.
    """
