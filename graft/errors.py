"""One error type for everything a user can get wrong at graft's boundaries.

The CLI prints ``str(error)`` on one line and exits non-zero; library users catch
``GraftError``. Messages name the file, line, key or field at fault.
"""


class GraftError(Exception):
    """A user-facing error: bad file, bad config, bad data, bad flag."""
