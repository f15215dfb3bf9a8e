class UserError(Exception):
    """An error a user can fix; the CLI prints its message as one line and exits non-zero."""
