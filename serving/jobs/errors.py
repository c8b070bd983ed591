"""The batch job's errors: raised where the job cannot go on, their messages say why and what to change."""


class BatchError(RuntimeError):
    """The job cannot go on; the message says why and what to change."""


class InputError(BatchError):
    """The input or the flags cannot work (a missing or unreadable file, flags that do not go together): a user
    mistake, answered with one line and exit code 2 rather than a traceback."""
