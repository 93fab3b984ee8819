"""The base of the errors srbinarize raises for bad input (a file, a layer, a key, a setting).

Each message says which and what was expected; the command line prints it as one line, no traceback.
"""


class SrbinarizeError(ValueError):
    """Bad input that the user can fix; subclasses say where it was found."""
