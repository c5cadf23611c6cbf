"""One exception type for every problem a user can fix (bad data, bad options, missing weights).

The CLI prints these as a one-line message instead of a traceback; anything else is a bug.
"""


class WbcidError(ValueError):
    """A problem with the user's input, explained in words the user can act on."""
