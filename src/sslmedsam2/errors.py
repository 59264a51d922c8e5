"""Errors a user can fix; the command line prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""


class WorkerError(RuntimeError):
    """A helper process failed (the ITK worker): the command line prints it as one line; the next request starts
    a new worker."""
