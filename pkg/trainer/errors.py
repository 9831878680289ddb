"""Expected failures of the trainer: reported as one line, no traceback, non-zero exit."""


class TrainerError(Exception):
    """An input problem the user can fix (bad model files, bad dataset, ...). Exit code 1."""

    exit_code = 1


class ConfigError(TrainerError):
    """A bad key or value in the config or on the command line. Exit code 2, like argparse."""

    exit_code = 2


class CheckpointError(TrainerError):
    """A checkpoint that cannot be used; the message is one line saying why and what to do."""


class CheckpointUnreadable(CheckpointError):
    """A complete checkpoint whose files fail to load (damaged in place); the message names the file."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
