"""Expected failures of the trainer: reported as one line, no traceback, non-zero exit."""


class TrainerError(Exception):
    """An input problem the user can fix (bad model files, bad dataset, ...). Exit code 1."""

    exit_code = 1


class ConfigError(TrainerError):
    """A bad key or value in the config or on the command line. Exit code 2, like argparse."""

    exit_code = 2
