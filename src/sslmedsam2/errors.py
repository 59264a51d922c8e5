"""Errors a user can fix; the command line prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""
