"""What a failed collective raises, and the one bound every wait for a peer obeys.

Every backend waits for its peers for at most ``timeout_s`` seconds (the
``timeout_s=`` option, else ``$FLASHCOMM_TIMEOUT_S``, else 30).  A rank that
gives up raises :class:`FlashTimeoutError`, tells its peers (the GPU kernels
poison the shared workspace, the CPU backend sends an abort message), and
every peer's pending or later call raises the same error class, naming the
rank that was late.  The communicator stays unusable until it is closed and
made anew (docs/reliability.md).
"""
from __future__ import annotations

from . import settings

DEFAULT_TIMEOUT_S = settings.DEFAULT_TIMEOUT_S
MAX_TIMEOUT_S = settings.MAX_TIMEOUT_S
TIMEOUT_ENV = settings.TIMEOUT_S


class FlashTimeoutError(RuntimeError):
    """A rank waited longer than the bound for a peer, or a peer gave up on a call.

    ``late`` is the rank the first failure waited for, where known.
    """

    def __init__(self, message: str, late=None):
        super().__init__(message)
        self.late = late


class PeerTransferError(RuntimeError):
    """A transfer between ranks failed outright (over torch.distributed's gloo: a peer closed its
    connection, having given up on the call or exited), so its receive buffers hold no data.  The
    CPU backend gives up the communicator on it and raises :class:`FlashTimeoutError`."""


def resolve_timeout(timeout_s=None) -> float:
    """The bound in seconds: ``timeout_s``, else ``$FLASHCOMM_TIMEOUT_S``, else 30.

    Raises ValueError (naming where the value came from) unless it is a
    finite number of seconds in (0, 1e6].
    """
    return settings.resolve(settings.TIMEOUT_S, timeout_s, "timeout_s")
