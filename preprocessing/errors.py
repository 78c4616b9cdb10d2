"""The one exception type for bad input: its message is a single line naming the file and the problem."""


class InputError(Exception):
    """Bad user input (a file, a table, a config value). The CLI prints it as one line and exits 2."""
