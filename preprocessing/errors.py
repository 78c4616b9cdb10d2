"""The one exception type for bad input: its message is a single line naming the file and the problem."""


class InputError(ValueError):
    """Bad user input (a file, a table, a config value). The CLI prints it as one line and exits 2.

    A subclass of :class:`ValueError` (it is a bad value), but the CLI catches only this class: any other
    ``ValueError`` is a bug and shows its traceback.
    """
