"""One error type for everything a user can get wrong; the CLI turns it into one line and exit code 2."""


class DynapruneError(Exception):
    """Bad input: an unknown model, a missing or corrupt file, an invalid recipe, empty text, ..."""
