"""The GPU fault matrix (docs/reliability.md), run under MPI on 2 or more GPUs.

    mpirun -n 2 python tests/gpu/fault_checks.py [--only NAME,...] [--bound 2]

Every case ends in the right answer or in FlashTimeoutError on every rank
within the bound -- never in a finite wrong value.  Inputs are constant per
rank (rank + 1), so the exact sum is known for every mode (a constant group
quantizes exactly) and each output element is either that sum, NaN, or wrong.
Prints one line per case and ``OK: ...`` on rank 0 when every case passed.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import numpy as np

import flashcomm_cupy as fc
from flashcomm_cupy.config import Mode
from flashcomm_cupy.dtypes import bfloat16

#: (label, protocol, algo, bits, elements, staged, rotate): every kernel family
KERNELS = [
    ("flag two-shot", "flag", "twoshot", 8, 1 << 20, False, False),
    ("staged two-shot", "flag", "twoshot", 4, 1 << 20, True, False),
    ("flag one-shot", "flag", "oneshot", 4, 1 << 16, False, False),
    ("flag lossless two-shot", "flag", "twoshot", None, 1 << 20, False, False),
    ("LL one-shot", "ll", "oneshot", None, 1 << 14, False, False),
    ("LL two-shot", "ll", "twoshot", None, 1 << 15, False, False),
    ("quantized LL one-shot", "ll", "oneshot", 8, 1 << 14, False, False),
    ("quantized LL two-shot", "ll", "twoshot", 4, 1 << 16, False, False),
    # its own build (fc_llq_oneshot_rot, plan.shares_rotation_code): 2^17 elements are 512 warps of 8-element units
    ("rotating quantized LL one-shot", "ll", "oneshot", 4, 1 << 17, False, True),
]
#: the kernels of the dead-peer cases (a rank that never comes, then calls after everyone gave up)
DEAD_PEER_KERNELS = [KERNELS[0], KERNELS[4]]
DEFAULT_BOUND_S = 2.0


class Cases:
    def __init__(self, world_comm, bound_s):
        self.world = world_comm
        self.rank = world_comm.Get_rank()
        self.size = world_comm.Get_size()
        self.last = self.size - 1
        self.bound_s = bound_s
        self.failures = []
        self.count = 0
        self.rows = []  # (case, outcome) for the table in docs/reliability.md

    # ------------------------------------------------------------------ helpers
    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def agree(self, ok: bool) -> bool:
        return all(self.world.allgather(bool(ok)))

    def record(self, case, ok, detail):
        self.count += 1
        ok = self.agree(ok)
        details = self.world.gather(detail, root=0)
        if self.rank == 0:
            outcome = "OK" if ok else "FAIL"
            print(f"{outcome:4} {case}: " + " | ".join(f"r{r}: {d}" for r, d in enumerate(details)), flush=True)
            self.rows.append((case, outcome, details))
        if not ok:
            self.failures.append(f"{case}: {detail}")

    def comm(self, protocol="auto"):
        c = fc.Communicator(self.world, backend="gpu", timeout_s=self.bound_s, protocol=protocol)
        if c.backend_name != "gpu":
            raise RuntimeError("the flash GPU backend is unavailable (fell back)")
        return c

    def inputs(self, n, dtype="float16"):
        import cupy
        return cupy.full(n, self.rank + 1, dtype=cupy.float16 if dtype == "float16" else cupy.float32)

    def expected(self, n=None, bits=None, algo="auto", rotate=False):
        """What every output element must be: the exact sum of the constant inputs, or, for a
        rotating mode (rotation spreads a constant group over many code values), the reference's
        n results as float32."""
        if not rotate:
            return self.size * (self.size + 1) / 2
        import cupy
        host = [np.full(n, r + 1, dtype=np.float16) for r in range(self.size)]
        want = fc.flash_all_reduce_reference(host, mode=Mode.make(bits, 128, False, True, algo))[0]
        return cupy.asarray(want.astype(np.float32))

    def verdict(self, out, want=None):
        """(exact, nan, wrong) element counts of an output (constant inputs; ``want``: expected())."""
        import cupy
        v = out.astype(cupy.float32)
        nan = int(cupy.isnan(v).sum())
        exact = int((v == (self.expected() if want is None else want)).sum())
        return exact, nan, int(v.size) - exact - nan

    def raised(self, fn):
        t0 = time.monotonic()
        try:
            fn()
        except fc.FlashTimeoutError as exc:
            return exc, time.monotonic() - t0
        return None, time.monotonic() - t0

    @staticmethod
    def force(comm, staged):
        if staged:
            comm.backend.force_launch = (256, 264, 1, "flag", True)

    # ------------------------------------------------------------------ cases
    def late_peer(self, label, protocol, algo, bits, n, staged, rotate, dead=False):
        """The last rank comes later than the bound (or never, then later): every rank raises
        FlashTimeoutError, every output element is the sum or NaN, and the next call raises at once."""
        comm = self.comm(protocol)
        self.force(comm, staged)
        x = self.inputs(n)
        want = self.expected(n, bits, algo, rotate)
        out = comm.all_reduce(x, bits=bits, algo=algo, rotate=rotate)  # warm-up: compiled, exact
        comm.synchronize()
        warm = self.verdict(out, want)
        self.world.Barrier()
        if self.rank == self.last:
            time.sleep(self.bound_s + 1.5)
        out.fill(0)

        def call():
            return comm.all_reduce(x, out=out, bits=bits, algo=algo, rotate=rotate)

        exc, dt = None, 0.0
        if not (dead and self.rank == self.last):
            exc, dt = self.raised(lambda: (call(), comm.synchronize()))
        else:  # the dead rank wakes up after everyone gave up and calls anyway
            self.world.Barrier()
            exc, dt = self.raised(lambda: (call(), comm.synchronize()))
        if dead and self.rank != self.last:
            self.world.Barrier()
        exact, nan, wrong = self.verdict(out, want)
        again, _ = self.raised(call)
        ok = (warm[0] == n and exc is not None and again is not None and wrong == 0
              and dt < self.bound_s + 5.0 + (self.bound_s + 1.5 if self.rank == self.last else 0))
        who = f"late {exc.late}" if exc is not None else "no error"
        self.record(f"{'dead' if dead else 'late'} peer, {label}", ok,
                    f"{who} after {dt:.1f} s, {exact} exact / {nan} NaN / {wrong} wrong, next call "
                    f"{'raises' if again is not None else 'did not raise'}")
        comm.close()

    def graph_replays(self):
        """Graph replays before and after a stall past the bound: exact before; after, every replay
        leaves sum-or-NaN on every rank and comm.check() raises on every rank."""
        import cupy
        from flashcomm_cupy.backends.cuda_util import capture_graph
        comm = self.comm()
        specs = [(1 << 12, Mode.make(None, algo="oneshot")), (1 << 16, Mode.make(4, algo="twoshot")),
                 (1 << 20, Mode.make(8, algo="twoshot"))]
        bufs = [(self.inputs(n), cupy.empty(n, dtype=cupy.float16), mode) for n, mode in specs]
        for x, out, mode in bufs:
            comm.backend.all_reduce(x, out, mode, dtype=np.float16)
        comm.synchronize()

        def step():
            for x, out, mode in bufs:
                comm.backend.all_reduce(x, out, mode, dtype=np.float16)

        replay = capture_graph(step, 1)
        before = [0, 0, 0]
        for _ in range(5):
            replay()
            replay.stream.synchronize()
            for _, out, _ in bufs:
                before = [a + b for a, b in zip(before, self.verdict(out))]
        self.world.Barrier()
        if self.rank == self.last:
            time.sleep(self.bound_s + 1.5)
        after = [0, 0, 0]
        for i in range(5):
            for _, out, _ in bufs:
                out.fill(0)
            replay()
            replay.stream.synchronize()
            for _, out, _ in bufs:
                after = [a + b for a, b in zip(after, self.verdict(out))]
        exc, _ = self.raised(comm.check)
        total = sum(n for n, _ in specs)
        ok = before[0] == 5 * total and after[2] == 0 and after[1] > 0 and exc is not None
        self.record("graph replays before/after a stall", ok,
                    f"before: {before[0]}/{5 * total} exact; after: {after[0]} exact / {after[1]} NaN / "
                    f"{after[2]} wrong; check() {'raises' if exc is not None else 'did not raise'}")
        comm.close()

    def numpy_absent_peer(self):
        """NumPy in and out with a peer that never calls: the call itself raises (host-synchronous)."""
        comm = self.comm()
        x = np.full(1 << 16, self.rank + 1, dtype=np.float16)
        y = comm.all_reduce(x, bits=None)
        warm = int((y == self.expected()).sum())
        exc, dt = None, 0.0
        if self.rank != self.last:
            exc, dt = self.raised(lambda: comm.all_reduce(x, bits=4))
        self.world.Barrier()
        later, _ = self.raised(lambda: comm.all_reduce(x, bits=4))
        ok = warm == x.size and (self.rank == self.last or (exc is not None and dt < self.bound_s + 5)) \
            and later is not None
        self.record("NumPy arrays, absent peer", ok,
                    f"{'raised in the call' if exc is not None else 'absent' if self.rank == self.last else 'NO ERROR'}"
                    f" ({dt:.1f} s); later call {'raises' if later is not None else 'did not raise'}")
        comm.close()

    def misaligned_side_stream(self):
        """A misaligned input produced on a side stream and reduced on it: exact."""
        import cupy
        comm = self.comm()
        side = cupy.cuda.Stream(non_blocking=True)
        ok_all, detail = True, []
        for bits in (None, 4):
            with side:
                base = cupy.empty((1 << 18) + 1, dtype=cupy.float16)
                x = base[1:]  # 2 bytes past a 256-byte boundary
                x.fill(self.rank + 1)
            out = comm.all_reduce(x, bits=bits, stream=side)
            side.synchronize()
            exact, nan, wrong = self.verdict(out)
            ok_all &= exact == x.size
            detail.append(f"bits {bits}: {exact}/{x.size} exact")
        self.record("misaligned input from a side stream", ok_all, ", ".join(detail))
        comm.close()

    def two_communicators_opposite_order(self):
        """Two communicators whose full grids run on two streams, dispatched in opposite orders by the
        ranks: the right answer, or FlashTimeoutError on every rank (never a wrong value)."""
        import cupy
        a, b = self.comm(), self.comm()
        sa, sb = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
        n = 1 << 22
        xa, xb = self.inputs(n), self.inputs(n)
        oa, ob = cupy.zeros_like(xa), cupy.zeros_like(xb)
        order = [(a, xa, oa, sa), (b, xb, ob, sb)]
        if self.rank % 2:
            order.reverse()
        for c, x, o, s in order:
            c.all_reduce(x, out=o, bits=4, algo="twoshot", stream=s)
        errors = []
        for c in (a, b):
            exc, _ = self.raised(c.synchronize)
            errors.append(exc)
        va, vb = self.verdict(oa), self.verdict(ob)
        fine = [v[0] == n for v in (va, vb)]
        ok = va[2] == 0 and vb[2] == 0 and all(f or e is not None for f, e in zip(fine, errors))
        self.record("two communicators, opposite order on two streams", ok,
                    f"A {va[0]} exact/{va[1]} NaN/{va[2]} wrong ({'error' if errors[0] else 'ok'}), "
                    f"B {vb[0]} exact/{vb[1]} NaN/{vb[2]} wrong ({'error' if errors[1] else 'ok'})")
        for c in (a, b):
            c.close()

    def epoch_gap(self):
        """One algorithm runs past 2^31 rounds while the other idles (simulated by moving the two-shot's
        epochs and flags ahead on the device), then both run, and both wrap past 2^32: always exact."""
        import cupy
        comm = self.comm("flag")
        be = comm.backend
        lay = be.ws.layout
        mb = lay.max_blocks
        x = self.inputs(1 << 18)

        def words(off, count):
            return cupy.ndarray((count,), dtype=cupy.uint32,
                                memptr=cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(be.ws.ptr, lay.total, be), off))

        def jump(epoch_off, flag_sets, value):
            comm.synchronize()
            self.world.Barrier()  # nobody is inside a kernel
            words(epoch_off, mb)[...] = value
            for k in flag_sets:  # what every peer has signalled so far: the same round
                words(lay.flags_off + k * lay.flag_set_bytes, lay.flag_set_bytes // 4)[...] = value
            cupy.cuda.Device().synchronize()
            self.world.Barrier()

        exact = total = 0

        def run(algo, calls):
            nonlocal exact, total
            for _ in range(calls):
                out = comm.all_reduce(x, bits=4, algo=algo)
                exact += self.verdict(out)[0]
                total += x.size
            comm.synchronize()

        run("twoshot", 3)
        run("oneshot", 3)
        jump(lay.ts_epoch_off, (0, 1), np.uint32(0x80000010))  # the two-shot ran 2^31 rounds alone
        run("oneshot", 20)
        run("twoshot", 20)
        jump(lay.os_epoch_off, (2,), np.uint32(0xFFFFFFF0))  # both counters wrap past 2^32
        jump(lay.ts_epoch_off, (0, 1), np.uint32(0xFFFFFFF0))
        run("oneshot", 40)
        run("twoshot", 40)
        self.record("epoch gap of 2^31 rounds and counter wrap", exact == total, f"{exact}/{total} exact")
        comm.close()

    def subnormals(self):
        """bf16 and float32 subnormals are summed as IEEE does (no flush to zero): bit-exact vs the reference."""
        comm = self.comm()
        ok_all, detail = True, []
        tiny = {"bfloat16": np.array([1, 2, 0x7F, 0x8001], dtype=np.uint16).view(bfloat16),
                "float32": np.array([1, 3, 0x7FFFFF, 0x80000001], dtype=np.uint32).view(np.float32)}
        for dtname, vals in tiny.items():
            host = np.resize(vals, 1 << 12) if self.rank % 2 == 0 else np.resize(vals[::-1], 1 << 12)
            ins = [np.resize(vals, 1 << 12) if r % 2 == 0 else np.resize(vals[::-1], 1 << 12)
                   for r in range(self.size)]
            for bits in (None, 8):
                for algo in ("oneshot", "twoshot"):
                    y = comm.all_reduce(host, bits=bits, algo=algo)
                    ref = fc.flash_all_reduce_reference(ins, bits=bits, algo=algo)[0]
                    w = np.uint16 if dtname == "bfloat16" else np.uint32
                    wrong = int((y.view(w) != ref.view(w)).sum())
                    ok_all &= wrong == 0
                    detail.append(f"{dtname} {bits or 'lossless'} {algo}: {wrong} differ")
        self.record("bf16/float32 subnormals vs the reference", ok_all, ", ".join(detail))
        comm.close()


def precompile(world_comm):
    """Compile every module first, under the default bound: a rank still compiling (seconds on a
    fresh machine) would otherwise look late to a 2-second bound."""
    warm = fc.Communicator(world_comm, backend="gpu")
    warm.backend.precompile()
    warm.close()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="comma list: late,dead,graphs,numpy,misaligned,two,epochs,subnormals")
    p.add_argument("--bound", type=float, default=DEFAULT_BOUND_S, help="timeout_s of the communicators under test")
    args = p.parse_args(argv)
    from mpi4py import MPI
    cases = Cases(MPI.COMM_WORLD, args.bound)
    only = set(filter(None, args.only.split(",")))
    plan = [("subnormals", cases.subnormals), ("epochs", cases.epoch_gap),
            ("misaligned", cases.misaligned_side_stream), ("two", cases.two_communicators_opposite_order),
            ("numpy", cases.numpy_absent_peer), ("graphs", cases.graph_replays)]
    plan += [("late", lambda k=k: cases.late_peer(*k)) for k in KERNELS]
    plan += [("dead", lambda k=k: cases.late_peer(*k, dead=True)) for k in DEAD_PEER_KERNELS]
    t0 = time.perf_counter()
    cases.log(f"flashcomm GPU fault matrix: {cases.size} ranks, bound {args.bound:g} s")
    precompile(MPI.COMM_WORLD)
    cases.log(f"kernels compiled/loaded in {time.perf_counter() - t0:.1f} s")
    for name, fn in plan:
        if only and name not in only:
            continue
        try:
            fn()
        except Exception:
            cases.failures.append(f"{name}: exception on rank {cases.rank}")
            print(f"rank {cases.rank}: {name} raised:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(2)
    failed = MPI.COMM_WORLD.allreduce(len(cases.failures))
    cases.log(f"{'OK' if failed == 0 else 'FAILED'}: {cases.count} fault cases, {failed} failures, "
              f"{time.perf_counter() - t0:.0f} s")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
