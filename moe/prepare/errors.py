"""The one error type of ``moe-prepare``: bad input it reports in a single line."""


class PrepareError(ValueError):
    """An input, option or output that ``moe-prepare`` cannot use; the message names the value."""
