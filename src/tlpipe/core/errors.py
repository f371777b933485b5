"""The error a user can act on.

Stage scripts print a :class:`PipelineError` as one clear line (no traceback) and
exit non-zero; any other exception is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Bad params, missing or unusable input data: the message says what to fix."""
