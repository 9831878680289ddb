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


class RowError(TrainerError):
    """A problem of one dataset row, raised with its index in the split: `row {row}{rest}` ("row 3 has no
    'output'", "row 3: ..."). Where the split's files are known, data_files.RowOrigins names the file and
    line instead of the index."""

    def __init__(self, row: int, rest: str) -> None:
        super().__init__(f"row {row}{rest}")
        self.row, self.rest = row, rest


class MessageError(TrainerError):
    """A problem of one conversation's messages, raised where its row is not known (chat_format); the caller
    that knows the row raises it as a RowError."""


def at_row(i: int, render, *args):
    """render(*args); a MessageError it raises becomes row i's RowError."""
    try:
        return render(*args)
    except MessageError as exc:
        raise RowError(i, f": {exc}") from None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
