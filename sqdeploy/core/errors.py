"""User-facing errors.

Every problem a user can cause (bad path, unknown recipe, shapes that do not fit a
scheme, NaN in calibration) is raised as an :class:`SqDeployError` whose message
names the problem *and* the fix. The CLIs print it on one line and exit non-zero;
anything else is a bug and keeps its traceback.
"""


class SqDeployError(Exception):
    """A problem with the user's input, reported as one line with its remedy."""


class MissingDependencyError(SqDeployError):
    """An optional package (TensorRT, TensorRT-LLM, lm-eval, ...) is not installed."""

    def __init__(self, package: str, purpose: str, install: str | None = None):
        hint = install or f"pip install {package}"
        super().__init__(f"{purpose} needs the '{package}' package, which is not installed: {hint}")
        self.package = package
