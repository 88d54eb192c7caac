"""GPU checks of the transports (IPC over legacy or virtual-memory handles, host memory), under MPI.

    FLASHCOMM_TRANSPORT=host mpiexec -n 2 python tests/gpu/transport_checks.py --expect host
    mpiexec -n 2 bash -c 'CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK \
        python tests/gpu/transport_checks.py --expect "ipc (virtual-memory"'

Checks, collective, every rank in the same order:

* the transport in use is the one expected (``--expect``: a prefix of
  ``describe()["transport"]``), and every rank reports the same;
* stale reads: thousands of calls of each protocol (flag, LL, the staged
  two-shot) and algorithm, cycling
  through four input sets of the same size, so a load that returned a slot's
  previous contents (a stale cache line of mapped host memory, say) shows up
  as a wrong element; results compared bit for bit with the NumPy reference;
* ``--vmm``: a workspace shared through virtual-memory handles is built
  directly (whatever ``auto`` chose) and must pass the canary;
* ``--kill``: the last rank kills itself (SIGKILL) once the communicator is
  up; run it, then check ``/dev/shm`` holds no ``flashcomm-*`` name.

The exactness, graph and timeout checks of ``gpu_checks.py`` run unchanged
under any transport through ``$FLASHCOMM_TRANSPORT``.  Exit status 0 only if
every check passed.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

import flashcomm_cupy as fc
from flashcomm_cupy.config import Mode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_checks import host_input, to_device  # noqa: E402

SETS = 4
CASES = [  # (elements, mode, protocol): flag and LL, one-shot and two-shot, lossless and quantized
    (4099, Mode.make(None, algo="oneshot"), "ll"),
    (65_537, Mode.make(4, algo="oneshot"), "ll"),
    (200_003, Mode.make(None, algo="twoshot"), "ll"),
    (65_537, Mode.make(8, algo="twoshot"), "flag"),
    (1 << 20, Mode.make(4, algo="twoshot"), "flag"),
    (1 << 20, Mode.make(None, algo="oneshot"), "flag"),
    (3 << 20, Mode.make((4, 8), algo="twoshot"), "flag"),
    (3 << 20, Mode.make(4, algo="twoshot"), "staged"),  # reads through cp.async.cg
]
#: force_launch of the "staged" case: 256 threads, blocks as the message needs, 2 units, flags, staged
STAGED_LAUNCH = (256, 0, 2, "flag", True)


def check_stale_reads(comm, calls_per_case: int, log) -> int:
    """Wrong elements on this rank over every case (0 when all exact)."""
    import cupy
    backend = comm.backend
    rank, world = comm.rank, comm.world_size
    wrong_total = 0
    for n, mode, protocol in CASES:
        backend.protocol = "flag" if protocol == "staged" else protocol
        backend.force_launch = STAGED_LAUNCH if protocol == "staged" else None
        sets = []
        for s in range(SETS):
            ins = [host_input(300 + s, r, n, "float16") for r in range(world)]
            ref = fc.flash_all_reduce_reference(ins, mode=mode)[0]
            sets.append((to_device(ins[rank]), cupy.asarray(ref).view(cupy.uint16)))
        out = cupy.empty(n, dtype=cupy.float16)
        wrong = cupy.zeros((), dtype=cupy.int64)
        ran = backend.resolve_protocol(n * 2, mode) or "nccl"
        t0 = time.perf_counter()
        for k in range(calls_per_case):
            x, ref = sets[k % SETS]
            backend.all_reduce(x, out, mode, dtype=np.float16)
            wrong += (out.view(cupy.uint16) != ref).sum()
        comm.synchronize()
        dt = time.perf_counter() - t0
        got = int(wrong.get())
        wrong_total += got
        bad = comm.mpi_comm.allreduce(got)
        log(f"  stale reads: n={n} {mode.label} {protocol}->{ran}: {calls_per_case} calls, "
            f"{1e6 * dt / calls_per_case:.1f} us/call eager, {bad} wrong elements (all ranks)")
    backend.protocol, backend.force_launch = "auto", None
    return wrong_total


def check_virtual_memory_handles(comm, log) -> list:
    """Build a workspace shared through virtual-memory handles next to the backend's (collective)."""
    from flashcomm_cupy.backends.ipc import PeerAccessError
    from flashcomm_cupy.backends.vmm import VmmWorkspace
    backend = comm.backend
    try:
        ws = VmmWorkspace(comm.mpi_comm, backend.ws.layout, backend.device_id)
    except PeerAccessError as exc:
        return [f"virtual-memory handles: {exc}"]
    log(f"  virtual-memory handles: {ws.layout.total >> 20} MiB per rank mapped by every rank, canary OK")
    ws.close()
    return []


class TransportChecks:
    """The checks of this script on one communicator, for main() and tests/gpu/test_transport_gpu.py.
    Collective: every rank calls the same checks in the same order; each appends to ``failures``."""

    def __init__(self, expect: str = ""):
        from mpi4py import MPI
        self.world_comm = MPI.COMM_WORLD
        self.comm = fc.Communicator(MPI.COMM_WORLD, backend="gpu")
        self.rank, self.world = self.comm.rank, self.comm.world_size
        self.expect = expect
        self.failures = []
        self.compiled = False
        desc = self.comm.describe()
        self.transports = self.world_comm.allgather(desc.get("transport"))
        self.log(f"flashcomm transport checks: {self.world} ranks, backend {self.comm.backend_name}, transport "
                 f"{self.transports[0]}, NCCL P2P disabled: {desc.get('nccl_p2p_disabled')}, devices "
                 + ", ".join(self.world_comm.allgather(f"{desc.get('gpu')} [{desc.get('pci_bus_id')}]")))

    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def check_transport(self) -> None:
        """The flash backend runs, on the same transport on every rank, the one expected."""
        if self.comm.backend_name != "gpu":
            self.failures.append("flash GPU backend unavailable (fell back to NCCL)")
        elif len(set(self.transports)) != 1 or not str(self.transports[0]).startswith(self.expect):
            self.failures.append(f"transport {self.transports} is not {self.expect!r}")

    def check_vmm(self) -> None:
        self.failures += check_virtual_memory_handles(self.comm, self.log)

    def check_stale_reads(self, calls: int) -> None:
        if not self.compiled:
            t0 = time.perf_counter()
            self.comm.backend.precompile(dtypes=("float16",))
            self.log(f"kernels compiled/loaded in {time.perf_counter() - t0:.1f} s")
            self.compiled = True
        wrong = check_stale_reads(self.comm, calls, self.log)
        if wrong:
            self.failures.append(f"stale reads: {wrong} wrong elements")

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--expect", default="", help="prefix the transport in use must have, e.g. host or 'ipc (virtual'")
    p.add_argument("--calls", type=int, default=2000, help="calls per stale-read case")
    p.add_argument("--vmm", action="store_true", help="also share a workspace through virtual-memory handles")
    p.add_argument("--kill", action="store_true", help="the last rank SIGKILLs itself after set-up")
    args = p.parse_args(argv)
    from mpi4py import MPI
    checks = TransportChecks(args.expect)
    rank, world = checks.rank, checks.world
    checks.check_transport()
    if args.vmm and checks.comm.backend_name == "gpu":
        checks.check_vmm()
    if args.kill:
        MPI.COMM_WORLD.Barrier()
        if rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        MPI.COMM_WORLD.Barrier()  # the job ends here
    if not checks.failures:
        checks.check_stale_reads(args.calls)
    checks.close()
    failures = list(dict.fromkeys(f for fs in MPI.COMM_WORLD.allgather(checks.failures) for f in fs))
    for f in failures:
        checks.log(f"FAIL {f}")
    checks.log(f"{'OK' if not failures else 'FAILED'}: transport checks, {len(failures)} failures")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
