"""Hand file descriptors between the ranks of one node over Unix-domain sockets.

CUDA's virtual-memory handles are exported as POSIX file descriptors, and a
file descriptor means something only inside its process: another process gets
its own descriptor for the same object by receiving it in an ``SCM_RIGHTS``
message.  :func:`exchange_fds` is the all-to-all of such a hand-off.

Each rank listens on an abstract-namespace socket (Linux: no file on disk,
gone with the process) named after a random token agreed over MPI, connects
to every peer's socket, and sends its descriptors.  A connection is accepted
only from a process of this job (the peer credentials' pid must be one the
ranks reported over MPI, which also defeats a stranger who reads the name
from ``/proc/net/unix``).  Every step is bounded by ``timeout_s``.
"""
from __future__ import annotations

import array
import os
import secrets
import socket
import struct
import time
from typing import List, Sequence

from .._mpi import first_failure

#: header of every hand-off message: sender rank, number of descriptors
_HEADER = struct.Struct("<ii")
#: at most this many descriptors per rank (kernel limit per SCM_RIGHTS message: 253)
MAX_FDS = 64


class FdExchangeError(RuntimeError):
    """The descriptor hand-off failed (same message on every rank)."""


def _socket_name(token: str, rank: int) -> str:
    return f"\0flashcomm-fd-{token}-{rank}"


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _receive(conn, pids: Sequence[int]) -> tuple:
    """(sender rank, its descriptors) from one accepted connection."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    msg, ancdata, _flags, _addr = conn.recvmsg(_HEADER.size, socket.CMSG_SPACE(MAX_FDS * 4), flags)
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    received = list(fds)
    if len(msg) != _HEADER.size:
        _close_all(received)
        raise ValueError(f"short hand-off message ({len(msg)} bytes) from pid {pid}")
    rank, count = _HEADER.unpack(msg)
    if not 0 <= rank < len(pids) or pids[rank] != pid:
        _close_all(received)
        raise PermissionError(f"a process (pid {pid}) that is not rank {rank} of this job connected")
    if count != len(received):
        _close_all(received)
        raise ValueError(f"rank {rank} announced {count} descriptors but {len(received)} arrived")
    return rank, received


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def exchange_fds(comm, fds: Sequence[int], timeout_s: float = 30.0) -> List[List[int]]:
    """Send ``fds`` to every other rank of ``comm`` (one node); collective.

    Returns, per rank, the descriptors that rank sent, as new descriptors of
    this process (close-on-exec; the caller owns and closes them).  The entry
    of this rank is a copy of ``fds`` itself (not duplicated).  Raises
    :class:`FdExchangeError` on every rank when any rank fails or the
    hand-off takes longer than ``timeout_s``; no received descriptor is left
    open then.
    """
    if len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} descriptors per rank, got {len(fds)}")
    rank, world = comm.Get_rank(), comm.Get_size()
    token = comm.bcast(secrets.token_hex(8) if rank == 0 else None, root=0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    failure = None
    try:
        listener.bind(_socket_name(token, rank))
        listener.listen(max(1, world))
    except OSError as exc:
        failure = f"rank {rank} cannot listen on a Unix socket for the descriptor hand-off ({exc})"
    infos = comm.allgather((os.getpid(), failure))
    failure = next((f for _, f in infos if f), None)
    received: List[List[int]] = [[] for _ in range(world)]
    received[rank] = list(fds)
    try:
        if failure is None:
            failure = _exchange(listener, token, rank, world, fds, [p for p, _ in infos], received, timeout_s)
        failure = first_failure(comm, failure)
    finally:
        listener.close()
    if failure is not None:
        for r in range(world):
            if r != rank:
                _close_all(received[r])
        raise FdExchangeError(failure)
    return received


def _exchange(listener, token, rank, world, fds, pids, received, timeout_s):
    """Send to every peer, then receive from every peer; the first failure or None.

    A send completes without the peer accepting: the connection waits in the
    listen backlog with the message and its descriptors, which survive the
    sender closing its end.  So every rank sends first and accepts after.
    """
    deadline = time.monotonic() + timeout_s
    heard = {rank}
    for i in range(1, world):
        r = (rank + i) % world
        error = _send(_socket_name(token, r), rank, fds, deadline)
        if error is not None:
            return f"rank {rank} could not hand its descriptors to rank {r} ({error})"
    for _ in range(world - 1):
        try:
            listener.settimeout(_remaining(deadline))
            conn, _ = listener.accept()
        except (TimeoutError, OSError):
            missing = ", ".join(str(r) for r in range(world) if r not in heard)
            return f"rank {rank} timed out after {timeout_s:g} s waiting for the descriptors of rank(s) {missing}"
        with conn:
            try:
                conn.settimeout(_remaining(deadline))
                src, got = _receive(conn, pids)
            except (OSError, ValueError) as exc:
                return f"rank {rank}: bad descriptor hand-off ({exc})"
        received[src] = got
        heard.add(src)
    return None


def _send(name, rank, fds, deadline):
    """Connect to ``name`` and send this rank's descriptors; None, or what went wrong."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            while True:
                try:
                    s.settimeout(_remaining(deadline))
                    s.connect(name)
                    break
                except (ConnectionRefusedError, FileNotFoundError, BlockingIOError):
                    time.sleep(0.001)  # the backlog is full for a moment
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            s.sendmsg([_HEADER.pack(rank, len(fds))], ancillary)
        except TimeoutError:
            return "timed out"
        except OSError as exc:
            return str(exc)
    return None
