"""The public entry point: :class:`Communicator`.

It picks a backend (the flash GPU kernels when CuPy sees a GPU, else the CPU
backend), converts the caller's arrays to the backend's native kind and back,
and validates them.  Backends live in :mod:`flashcomm_cupy.backends`.
"""
from __future__ import annotations

import atexit
import itertools
import weakref

import numpy as np

from . import _arrays
from ._eager import EagerCache
from .backends import registry
from .config import ALL_REDUCE_BITS, Mode

#: every ``backend=`` name (:mod:`flashcomm_cupy.backends.registry`)
BACKENDS = registry.NAMES
gpu_available = registry.gpu_available

#: open communicators by handle, a creation number.  Construction is collective, so
#: every rank numbers the same communicators alike: closing them in reverse creation
#: order at exit pairs each rank's close barrier with its peers' for the same one,
#: and the torch custom ops (which take no Python objects) find them by it.
_open = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def communicator_by_handle(handle: int) -> "Communicator":
    """The open communicator registered under ``handle`` (see :attr:`Communicator.torch_handle`)."""
    try:
        return _open[handle]
    except KeyError:
        raise ValueError(f"flashcomm: no open communicator has handle {handle} in this process "
                         "(closed, or never created here)") from None


def _make_backend(name: str, comm, options: dict):
    return registry.make(name, comm, **options)


class Communicator:
    """Flash All-Reduce over the ranks of an MPI communicator or a torch.distributed group.

    Parameters
    ----------
    comm : mpi4py communicator, optional
        Defaults to ``MPI.COMM_WORLD`` (unless ``group`` is given); in a process started by
        ``torchrun`` and no MPI launcher, to torch.distributed's world group where
        ``init_process_group`` has run (as :meth:`from_torch`), and an error where it has not
        and torchrun's ``WORLD_SIZE`` is above 1 (MPI's world would be this process alone).
    group : torch.distributed ProcessGroup, optional
        Bootstrap over this group instead of MPI (e.g. under ``torchrun``;
        see :meth:`from_torch`); no MPI library is needed then.
    backend : {"auto", "gpu", "cpu", "nccl"} (:data:`BACKENDS`)
        "auto" picks "gpu" when CuPy sees a GPU, else "cpu".  "gpu" moves
        the data through host memory when CUDA IPC or peer access does not
        work between the ranks, and falls back to NCCL, with one warning
        naming the reason, when that does not work either; when the ranks
        span nodes it is the hierarchical backend.
    **options
        Passed to the backend: ``timeout_s`` and ``validate`` for every
        backend; for "gpu" on one node, ``transport`` ("auto", "ipc" or "host",
        see README "GPUs without peer access"), ``device``, ``protocol``,
        ``slot_bytes``, ``max_blocks``, ``max_threads``, ``tuning_path`` (the
        arguments of ``backends.flash.backend.FlashGpuBackend``); across nodes
        only ``device``, ``timeout_s``, ``validate``, ``max_blocks`` and
        ``transport`` (the hierarchical backend names them when refusing
        another); ``ranks_per_node``, the testing override of node discovery,
        for "cpu" and "gpu".

    The communicator is a context manager; it is also closed at interpreter
    exit.
    """

    def __init__(self, comm=None, backend: str = "auto", *, group=None, **options):
        from . import _mpi
        from .launchers import launched_by_torchrun, under_mpi_launcher
        from .torch_group import TorchGroupComm, is_torch_group, torchrun_world
        if group is not None and comm is not None:
            raise ValueError("pass comm (an MPI communicator) or group (a torch.distributed group), not both")
        if group is not None or is_torch_group(comm):
            comm = TorchGroupComm(group if group is not None else comm)
        elif comm is None and launched_by_torchrun() and not under_mpi_launcher():
            comm = torchrun_world()
        #: the cross-rank interface (an mpi4py communicator, or :class:`.torch_group.TorchGroupComm`)
        self.mpi_comm = _mpi.get_comm(comm)
        self._backend = _make_backend(backend, self.mpi_comm, options)
        self._closed = False
        self._modes = {}
        self._eager = EagerCache(self._backend)
        self._torch_handle = next(_handles)
        _open[self._torch_handle] = self

    @classmethod
    def from_torch(cls, group=None, backend: str = "auto", **options) -> "Communicator":
        """A communicator over a torch.distributed group (default: the world group), for ``torchrun``.

        ``torch.distributed.init_process_group`` must have run (any backend:
        gloo, or NCCL with each rank's CUDA device set).  Construction is
        collective over ``group``'s ranks.
        """
        from .torch_group import TorchGroupComm
        return cls(TorchGroupComm(group), backend=backend, **options)

    # ------------------------------------------------------------------ properties
    @property
    def backend(self):
        """The backend object (see :class:`flashcomm_cupy.backends.base.Backend`)."""
        return self._backend

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def rank(self) -> int:
        return self._backend.rank

    @property
    def world_size(self) -> int:
        return self._backend.world_size

    @property
    def torch_handle(self) -> int:
        """This communicator's integer handle for the torch custom ops (:mod:`flashcomm_cupy.torch_ops`),
        unique in this process; :meth:`close` releases it.  A plain attribute, so ``torch.compile``
        reads it as a constant."""
        return self._torch_handle

    # ------------------------------------------------------------------ the op
    def all_reduce(self, x, bits=ALL_REDUCE_BITS, group_size: int = 128, algo: str = "auto",
                   rotate: bool = False, symmetric: bool = False, out=None, stream=None):
        """Sum ``x`` over all ranks.

        ``bits``: None (lossless), 4, 6, 8 (the default: ``config.ALL_REDUCE_BITS``), or a pair
        ``(rs_bits, ag_bits)`` such as ``(4, 8)``.  ``algo``: "auto", "oneshot", "twoshot",
        "hierarchical" (ranks on several nodes), or the
        baseline ("nccl" on GPUs, "mpi" on CPUs).  ``x`` may be a NumPy
        array, a CuPy array, or anything with ``__cuda_array_interface__`` or
        ``__dlpack__`` (a PyTorch tensor); the result is of the same kind and
        shape.  ``out is x`` reduces in place.  GPU work is ordered on
        ``stream`` (default: CuPy's current stream; for a PyTorch tensor,
        PyTorch's current stream on its device).  A NumPy input or CPU tensor
        is copied to the GPU and back, and the call returns once the result is
        on the host (raising there if the call failed).  ``out`` must not
        partially overlap ``x``.

        Repeated calls on the same CUDA buffers take a cached fast path
        (:mod:`flashcomm_cupy._eager`).
        """
        if not self._closed:
            done = self._eager.call(x, out, stream, bits, group_size, algo, rotate, symmetric)
            if done is not None:
                return done
        self._check_open()
        made = self._backend.calls_made
        try:
            mode = self._mode(bits, group_size, algo, rotate, symmetric)
            result = _arrays.run_all_reduce(self._backend, x, out, mode, stream)
        except BaseException:
            if self._backend.calls_made == made:  # refused here, before the backend saw it
                self._backend.note_call_not_made()
            raise
        self._eager.remember(x, out, stream, bits, group_size, algo, rotate, symmetric, mode)
        return result

    def _mode(self, bits, group_size, algo, rotate, symmetric) -> Mode:
        key = (type(bits), bits, group_size, algo, rotate, symmetric)
        try:
            return self._modes[key]
        except (KeyError, TypeError):
            pass
        mode = Mode.make(bits, group_size, symmetric, rotate, algo)
        try:
            if len(self._modes) < 256:
                self._modes[key] = mode
        except TypeError:  # unhashable bits, e.g. a list
            pass
        return mode

    def resolve_algo(self, nbytes: int, bits=ALL_REDUCE_BITS, group_size: int = 128, algo: str = "auto",
                     rotate: bool = False, symmetric: bool = False) -> str:
        """The concrete algorithm a call with these arguments runs."""
        mode = Mode.make(bits, group_size, symmetric, rotate, algo)
        return self._backend.resolve_algo(int(nbytes), mode)

    def synchronize(self) -> None:
        """Wait for queued work; raise if an earlier call timed out or failed."""
        self._check_open()
        self._backend.synchronize()

    def check(self) -> None:
        """Raise :class:`~flashcomm_cupy.FlashTimeoutError` if an earlier call of this communicator
        failed (on this rank, or on a peer that gave up), without waiting for queued work.

        GPU calls return before their kernels finish, so a failure inside a kernel (or a CUDA
        graph replay) surfaces here, in :meth:`synchronize`, or when the next call starts;
        its outputs hold NaN meanwhile (docs/reliability.md).
        """
        self._check_open()
        self._backend.check()

    def barrier(self) -> None:
        self._check_open()
        self._backend.barrier()

    def describe(self) -> dict:
        return self._backend.describe()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._eager.clear()
            _open.pop(self._torch_handle, None)
            self._backend.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this Communicator is closed")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            # Unwinding from an error: the other ranks may be inside another
            # collective, so a collective teardown could hang this rank before
            # it reaches MPI_Abort.  Resources go with the process.
            self._closed = True
        return False

    def __repr__(self):
        return (f"Communicator(backend={self.backend_name!r}, rank={self.rank}, "
                f"world_size={self.world_size})")


@atexit.register
def _close_all():  # pragma: no cover - runs at interpreter exit
    for key in sorted(_open.keys(), reverse=True):
        c = _open.get(key)
        if c is None:
            continue
        try:
            c.close()
        except Exception:
            pass


def as_numpy(x) -> np.ndarray:
    """Host copy of any supported array (NumPy, CuPy, torch, CAI/DLPack)."""
    return _arrays.to_numpy(x)
