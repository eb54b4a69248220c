"""The op layer's error, in its own module so that the backends raise it without importing the dispatcher
(which imports them)."""


class BackendUnavailable(RuntimeError):
    """A kernel backend cannot run here; the message says why (missing package, no GPU, no `_C` build)."""
