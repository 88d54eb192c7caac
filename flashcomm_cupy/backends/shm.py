"""A POSIX shared-memory segment shared by the ranks of one node.

Lifecycle (collective over the node's communicator):

1. rank 0 creates ``/dev/shm/<prefix>-<pid>-<random>`` (``O_EXCL``, mode 0600),
   reserves every page with ``posix_fallocate`` (so a full ``/dev/shm`` fails
   here with a clear message instead of a SIGBUS at first touch), maps it and
   lets the caller initialise it;
2. the name goes to the other ranks (``bcast``), which open and map it;
3. once every rank has reported its mapping, every rank unlinks the name.

From then on the segment has no name: the kernel frees it when the last
mapping goes, whether the processes exit normally, raise, or are killed.  A
name is left behind only when a rank dies between steps 1 and 3 (a window of
one collective); the next segment created with the same prefix removes such
leftovers (:func:`sweep_leftovers`).

Python's ``multiprocessing.shared_memory`` is not used: before Python 3.13 it
registers every attached segment with the ``resource_tracker``, which then
warns at exit about "leaked" segments (and unlinks them) in every process but
the creator.  Plain files under ``/dev/shm`` are what ``shm_open`` makes on
Linux, without that machinery.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import secrets
import time
from typing import Callable, Optional

from .._mpi import first_failure

SHM_DIR = "/dev/shm"
DEFAULT_PREFIX = "flashcomm"
#: A name older than this whose creator is gone is a leftover of a killed job: a live job
#: unlinks its name within one collective of creating it.
LEFTOVER_AGE_S = 30.0


class SharedMemoryError(RuntimeError):
    """The node's shared-memory segment could not be created or mapped (same message on every rank)."""


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def room_error(nbytes: int, shm_dir: str = SHM_DIR) -> Optional[str]:
    """The one-line error when ``shm_dir`` has less than ``nbytes`` free, else None."""
    st = os.statvfs(shm_dir)
    free = st.f_bavail * st.f_frsize
    if free >= nbytes:
        return None
    return (f"{shm_dir} has {_human(free)} free but the host transport needs {_human(nbytes)} ({nbytes} bytes) "
            f"for this node's workspaces; enlarge it (e.g. docker run --shm-size={-(-nbytes // (1 << 30)) + 1}g) "
            "or use fewer blocks (max_blocks) or smaller slots (slot_bytes)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_leftovers(prefix: str = DEFAULT_PREFIX, shm_dir: str = SHM_DIR, age_s: float = LEFTOVER_AGE_S) -> list:
    """Unlink this user's ``<prefix>-<pid>-*`` names whose creator is dead and that are older
    than ``age_s``; returns the names removed."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)-[0-9a-f]+$")
    removed = []
    now = time.time()
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.stat(path)
            if st.st_uid != os.getuid() or now - st.st_mtime < age_s or _pid_alive(int(m.group(1))):
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    return removed


class NodeSegment:
    """``nbytes`` of shared memory mapped by every rank of ``comm`` (which must be one node).

    Construction is collective; ``init(view)`` runs on rank 0 before any other
    rank maps the segment (e.g. to fill sentinel bytes), with ``view`` a
    writable ``memoryview`` of the whole segment.  Raises
    :class:`SharedMemoryError` on every rank, with the same message, when any
    rank fails.  ``address`` is the mapping's address in this process;
    ``view`` a ``memoryview`` of it.  :meth:`close` unmaps (local, not collective).
    """

    def __init__(self, comm, nbytes: int, init: Optional[Callable[[memoryview], None]] = None,
                 prefix: str = DEFAULT_PREFIX, shm_dir: str = SHM_DIR):
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        self.nbytes = int(nbytes)
        self.rank = comm.Get_rank()
        self._map = None
        self._anchor = None
        self.address = 0
        name, failure = None, None
        if self.rank == 0:
            name, failure = self._create(prefix, shm_dir, init)
        name, failure = comm.bcast((name, failure), root=0)
        path = os.path.join(shm_dir, name) if name else None
        if failure is None and self.rank != 0:
            failure = self._attach(path)
        failure = first_failure(comm, failure)
        if path is not None:  # every rank has mapped it (or given up): the name has served its purpose
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if failure is not None:
            self.close()
            raise SharedMemoryError(failure)
        self.name = name

    def _create(self, prefix, shm_dir, init):
        """Rank 0: (name, failure)."""
        sweep_leftovers(prefix, shm_dir)
        failure = room_error(self.nbytes, shm_dir)
        if failure is not None:
            return None, failure
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return None, f"cannot create {path} ({exc})"
        try:
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    return name, room_error(self.nbytes, shm_dir) or (
                        f"{shm_dir} could not reserve {_human(self.nbytes)} ({exc}); enlarge it")
                raise
            self._mmap(fd)
            if init is not None:
                init(self.view)
        except Exception as exc:
            return name, f"rank 0 cannot set up shared memory {path} ({type(exc).__name__}: {exc})"
        finally:
            os.close(fd)
        return name, None

    def _attach(self, path):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return f"rank {self.rank} cannot open {path} ({exc}); do all ranks share one {os.path.dirname(path)}?"
        try:
            size = os.fstat(fd).st_size
            if size != self.nbytes:
                return f"rank {self.rank}: {path} has {size} bytes, expected {self.nbytes}"
            self._mmap(fd)
        except Exception as exc:
            return f"rank {self.rank} cannot map {path} ({type(exc).__name__}: {exc})"
        finally:
            os.close(fd)
        return None

    def _mmap(self, fd):
        self._map = mmap.mmap(fd, self.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # The ctypes view pins the buffer export: it is what hands out the address.
        self._anchor = (ctypes.c_char * self.nbytes).from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)

    @property
    def view(self) -> memoryview:
        return memoryview(self._map)

    def close(self):
        """Unmap this rank's view (the memory goes once every rank has closed or exited)."""
        self._anchor = None
        self.address = 0
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: leave the mapping to process exit
                pass
            self._map = None
