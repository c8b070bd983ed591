"""The batch job's one error: raised where the job cannot go on, its message says why and what to change."""


class BatchError(RuntimeError):
    """The job cannot go on; the message says why and what to change."""
