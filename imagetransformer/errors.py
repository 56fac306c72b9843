"""One exception type for mistakes a user can fix: the CLI prints its message, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) whose message names the fix."""
