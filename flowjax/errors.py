"""Errors that flowjax reports to the user as one line (no stack trace)."""


class UserError(Exception):
    """Bad input from the user: a config field, a file, a workdir. The message is one line."""


class ConfigError(UserError):
    """A config field has a wrong name, type or value."""
