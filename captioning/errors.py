"""The errors a user can cause and fix: each message is the one line the commands print."""

class DataError(Exception):
    """Bad data a user can fix; the message names the file, row or column."""


class ModelLoadError(Exception):
    """A model or processor could not be loaded; the message names it and says what to do."""
