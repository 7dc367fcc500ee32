"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """A problem in the user's input (config, paths, data, models), with what to do about it."""
