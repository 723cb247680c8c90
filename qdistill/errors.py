"""One exception type for mistakes a user can fix; the CLI prints its message without a traceback."""


class QDistillError(Exception):
    """Bad input: a config value out of range, a missing or corrupt file, mismatched models."""
