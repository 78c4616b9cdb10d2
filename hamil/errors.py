"""Errors the CLI reports as one line (besides :class:`preprocessing.errors.InputError`)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the kept checkpoint."""
