"""The only exceptions users see. The CLI turns each into one line and exit code 2."""


class SquatError(Exception):
    """A problem the user can fix: bad input, missing files, unreachable hub."""


class RecipeError(SquatError):
    """A recipe key is unknown or its value is invalid."""


class DataError(SquatError):
    """GLUE data is missing, malformed or unreachable."""


class ModelError(SquatError):
    """A model cannot be loaded or saved."""


class RunError(SquatError):
    """A run folder is missing, incomplete or inconsistent."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: the command stops as on Ctrl-C (temporary files are removed on the way out), exit code 143."""


class DivergenceError(SquatError):
    """Training produced a non-finite loss or step size."""
