"""The batch job's errors: raised where the job cannot go on, their message says why and what to change."""


class BatchError(RuntimeError):
    """The job cannot go on; the message says why and what to change."""

    exit_code = 1


class InputError(BatchError):
    """The input or the flags cannot work (a missing or unreadable file, flags that do not go together): a user
    mistake, answered with one line and exit code 2 rather than a traceback."""

    exit_code = 2


class OutputOfAnotherModel(BatchError):
    """The output holds rows of another model or version (or rows that record none): going on would mix two
    models' answers in one output and one summary. A mistake in the command, like a bad flag, so exit code 2."""

    exit_code = 2
