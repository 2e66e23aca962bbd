"""The error of a benchmark row that cannot be asked, raised by the readers of data files (data.py) and of
recordings (recordings.py) alike."""


class BadRowError(ValueError):
    """A row that cannot be asked; the message is the reason reported with its index."""
