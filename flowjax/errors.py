"""Errors that flowjax reports to the user as one line (no stack trace)."""


class UserError(Exception):
    """Bad input from the user: a config field, a file, a workdir. The message is one line."""


class ConfigError(UserError):
    """A config field has a wrong name, type or value."""


class Preempted(Exception):
    """A signal (SIGTERM: preemption; SIGINT: Ctrl-C) stopped a loop after its progress was saved;
    rerunning the same command resumes. The message is one line; `signum` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
