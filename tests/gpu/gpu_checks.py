"""GPU checks of the flash backend against the NumPy reference, run under MPI.

    mpiexec -n 4 python tests/gpu/gpu_checks.py [--quick] [--only NAME,...]

Every rank runs the same checks in the same order (they are collective).
Rank 0 regenerates every rank's inputs, computes the reference and compares
bit for bit; the other ranks' outputs are compared with rank 0's by hash.
Exit status 0 only if every check passed.  ``tests/gpu/test_flash_gpu.py`` runs each
section (``Sections``) as a pytest test (marker ``multi_gpu``).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
import traceback

import numpy as np

import flashcomm_cupy as fc
from flashcomm_cupy import quant, hadamard
from flashcomm_cupy.config import Codec, Mode
from flashcomm_cupy.dtypes import DTYPES, bfloat16

DTYPE_NAMES = ("float16", "bfloat16", "float32")
BITS = (None, 4, 6, 8, (4, 8))


def host_input(seed: int, rank: int, n: int, dtype) -> np.ndarray:
    rng = np.random.default_rng([seed, rank, n])
    return rng.standard_normal(n, dtype=np.float32).astype(DTYPES[dtype] if isinstance(dtype, str) else dtype)


def to_device(x):
    import cupy
    return cupy.asarray(x.view(np.uint16)).view(cupy.uint16) if x.dtype == bfloat16 else cupy.asarray(x)


def digest(arr) -> str:
    host = arr.get() if hasattr(arr, "get") else np.asarray(arr)
    return hashlib.sha1(np.ascontiguousarray(host).view(np.uint8)).hexdigest()


class Checker:
    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.rank
        self.world = comm.world_size
        self.failures = []
        self.count = 0

    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def fail(self, what):
        self.failures.append(what)
        if self.rank == 0:
            print("FAIL", what, flush=True)

    def agree(self, ok: bool) -> bool:
        return all(self.comm.mpi_comm.allgather(bool(ok)))

    # ------------------------------------------------------------------ exactness
    def compare_with_reference(self, label, out_dev, n, dtype, mode, seed, algo, inputs=None, nodes=None):
        """out_dev: this rank's result (CuPy array, bf16 as uint16); ``nodes``: the layout of hierarchical."""
        self.count += 1
        hashes = self.comm.mpi_comm.allgather(digest(out_dev))
        if len(set(hashes)) != 1:
            self.fail(f"{label}: ranks differ ({hashes})")
            return
        if self.rank == 0:
            ins = inputs or [host_input(seed, r, n, dtype) for r in range(self.world)]
            ref = fc.flash_all_reduce_reference(ins, mode=mode.with_algo(algo), nodes=nodes)[0]
            got = out_dev.get()
            if got.dtype == np.uint16:
                got = got.view(bfloat16)
            ref_bits = ref.view(np.uint32 if ref.dtype == np.float32 else np.uint16)
            got_bits = got.view(ref_bits.dtype)
            same = (ref_bits == got_bits) | (np.isnan(ref.astype(np.float32)) & np.isnan(got.astype(np.float32)))
            if not same.all():
                bad = np.flatnonzero(~same)
                self.fail(f"{label}: {bad.size} of {n} elements differ from the reference, first at {bad[:5]}: "
                          f"got {got[bad[:5]]}, want {ref[bad[:5]]}")
        self.comm.mpi_comm.Barrier()

    def check_exact(self, sizes, dtypes=DTYPE_NAMES, bits_list=BITS, algos=("oneshot", "twoshot")):
        import cupy
        seed = 11
        for n in sizes:
            for dtype in dtypes:
                x = to_device(host_input(seed, self.rank, n, dtype))
                for bits in bits_list:
                    for rotate in ((False,) if bits is None else (False, True)):
                        for sym in ((False,) if bits is None else (False, True)):
                            for algo in algos:
                                mode = Mode.make(bits, 128, sym, rotate, algo)
                                out = cupy.full_like(x, 0x7E00 if x.dtype != cupy.float32 else np.nan)
                                self.comm.backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
                                label = f"exact n={n} {dtype} {mode.label}"
                                self.compare_with_reference(label, out, n, dtype, mode, seed, algo)
        self.log(f"exact: {self.count} cases checked")

    def check_group_sizes(self):
        import cupy
        n = 50_001
        x = to_device(host_input(5, self.rank, n, "float16"))
        for g in (32, 64, 256, 512, 1024):
            for algo in ("oneshot", "twoshot"):
                mode = Mode.make((4, 8), g, False, True, algo)
                out = cupy.empty_like(x)
                self.comm.backend.all_reduce(x, out, mode, dtype=np.float16)
                self.compare_with_reference(f"group {g} {mode.label}", out, n, "float16", mode, 5, algo)

    def check_codec_bytes(self):
        """The encode kernel writes the same wire bytes as quant.encode (rotation included)."""
        import cupy
        from flashcomm_cupy import _kernels
        rng = np.random.default_rng(3)
        for bits in (4, 6, 8):
            for sym in (False, True):
                for g, elems in ((32, 32), (128, 32), (1024, 32), (32, 16), (128, 16), (512, 16)):
                    for rotate in (False, True):
                        codec = Codec(bits, g, sym)
                        n = g * 37
                        x = (rng.standard_normal(n) * 3).astype(np.float32)
                        x[5] = 1e30  # beyond the fp16 range: metadata must stay finite
                        want_in = hadamard.rotate(x, g) if rotate else x
                        want = quant.encode(want_in, codec)
                        enc = _kernels.function("fc_encode_chunk", 2, bits, bits, elems)
                        dec = _kernels.function("fc_decode_chunk", 2, bits, bits, elems)
                        buf = cupy.zeros(quant.wire_nbytes(n, codec) + 64, dtype=cupy.uint8)
                        flags = (_kernels.FLAG_ROTATE if rotate else 0) | (_kernels.FLAG_SYM if sym else 0)
                        norm = np.float32(1 / np.sqrt(g))
                        units = n // elems
                        enc(((units + 127) // 128,), (128,), (cupy.asarray(x), buf, np.int64(n), np.int32(g),
                                                             np.int32(flags), norm))
                        got = buf.get()[:want.size]
                        self.count += 1
                        label = f"codec int{bits} g{g} sym={sym} rot={rotate} unit={elems}"
                        if not np.array_equal(got, want):
                            diff = np.flatnonzero(got != want)
                            self.fail(f"{label}: {diff.size} wire bytes differ, first at {diff[:4]}")
                            continue
                        back = cupy.empty(n, dtype=cupy.float32)
                        dec(((units + 127) // 128,), (128,), (buf, back, np.int64(n), np.int32(g), np.int32(flags),
                                                             norm))
                        ref = quant.decode(want, n, codec)
                        if rotate:
                            ref = hadamard.unrotate(ref, g)
                        if not np.array_equal(back.get().view(np.uint32), ref.view(np.uint32)):
                            self.fail(f"{label}: decode differs from quant.decode")
        self.log(f"codec: wire bytes checked ({self.count} total cases)")

    # ------------------------------------------------------------------ API surface
    def check_api(self):
        """NumPy, CuPy, torch inputs; in-place; a non-default stream; algo='auto' and 'nccl'."""
        import cupy
        comm = self.comm
        n = 70_001
        host = host_input(21, self.rank, n, "float16")
        y = comm.all_reduce(host, bits=8, algo="twoshot")
        ok = isinstance(y, np.ndarray) and y.dtype == np.float16
        self.compare_with_reference("numpy input", cupy.asarray(y), n, "float16", Mode.make(8), 21, "twoshot")
        s = cupy.cuda.Stream(non_blocking=True)
        x = cupy.asarray(host)
        with s:
            pass
        z = comm.all_reduce(x, bits=(4, 8), rotate=True, algo="twoshot", stream=s, out=x)
        s.synchronize()
        ok &= z is x
        self.compare_with_reference("in-place on a side stream", x, n, "float16",
                                    Mode.make((4, 8), rotate=True), 21, "twoshot")
        try:
            import torch
            t = torch.from_numpy(host_input(22, self.rank, n, "float32")).cuda(comm.backend.device_id)
            r = comm.all_reduce(t, bits=None, algo="oneshot")
            ok &= isinstance(r, torch.Tensor) and r.dtype == torch.float32
            self.compare_with_reference("torch fp32", cupy.asarray(r), n, "float32", Mode.make(None), 22, "oneshot")
            tb = torch.from_numpy(host_input(23, self.rank, n, "float32")).to(torch.bfloat16).cuda(
                comm.backend.device_id)
            rb = comm.all_reduce(tb, bits=4, algo="twoshot")
            ok &= rb.dtype == torch.bfloat16
            self.compare_with_reference("torch bf16", cupy.asarray(rb.view(torch.int16)).view(cupy.uint16), n,
                                        "bfloat16", Mode.make(4), 23, "twoshot")
        except ImportError:
            self.log("torch not installed: torch inputs skipped")
        ref_nccl = comm.all_reduce(cupy.asarray(host), bits=None, algo="nccl")
        exact = np.zeros(n, np.float64)
        for r in range(self.world):
            exact += host_input(21, r, n, "float16").astype(np.float64)
        ok &= float(np.abs(ref_nccl.get().astype(np.float64) - exact).max()) < 0.01 * self.world
        for bad, what in ((cupy.zeros(10, cupy.int32), "int32"), (cupy.zeros((10, 10), cupy.float16)[:, ::2], "strided")):
            try:
                comm.all_reduce(bad)
                ok = False
                self.fail(f"{what} input accepted")
            except (TypeError, ValueError):
                pass
        if not self.agree(ok):
            self.fail("api: wrong result kinds, identity or NCCL result")
        self.log("api: numpy / cupy / torch / in-place / stream / nccl / bad input checked")

    # ------------------------------------------------------------------ endurance
    def check_many_calls(self, calls):
        import cupy
        cases = [(7, Mode.make(None, algo="oneshot")), (4096, Mode.make(8)), (100_003, Mode.make((4, 8), rotate=True)),
                 (1 << 20, Mode.make(4, algo="twoshot")), (300_000, Mode.make(None, algo="twoshot")),
                 (65_536, Mode.make(6, symmetric=True, algo="oneshot"))]
        prepared = []
        for i, (n, mode) in enumerate(cases):
            x = to_device(host_input(100 + i, self.rank, n, "float16"))
            out = cupy.empty_like(x)
            algo = self.comm.backend.resolve_algo(n * 2, mode)
            ins = [host_input(100 + i, r, n, "float16") for r in range(self.world)]
            ref = fc.flash_all_reduce_reference(ins, mode=mode.with_algo(algo))[0]
            prepared.append((x, out, mode, cupy.asarray(ref)))
        wrong = 0
        t0 = time.perf_counter()
        for k in range(calls):
            x, out, mode, ref = prepared[k % len(prepared)]
            self.comm.backend.all_reduce(x, out, mode, dtype=np.float16)
            if k % len(prepared) == len(prepared) - 1 or k == calls - 1:
                for x2, o2, m2, r2 in prepared[: (k % len(prepared)) + 1]:
                    wrong += int((o2.view(cupy.uint16) != r2.view(cupy.uint16)).sum())
        self.comm.synchronize()
        dt = time.perf_counter() - t0
        if not self.agree(wrong == 0):
            self.fail(f"many calls: {wrong} wrong elements on rank {self.rank}")
        self.log(f"endurance: {calls} mixed calls in {dt:.1f} s, all exact")

    def check_graph_replays(self, replays):
        import cupy
        from flashcomm_cupy.backends.cuda_util import capture_graph
        specs = [(4099, Mode.make(None, algo="oneshot")), (200_000, Mode.make((4, 8), algo="twoshot")),
                 (33_333, Mode.make(8, rotate=True, algo="oneshot")), (1 << 21, Mode.make(4, algo="twoshot"))]
        sets = 3
        bufs, refs = [], []
        for j, (n, mode) in enumerate(specs):
            x = cupy.empty(n, dtype=cupy.float16)
            out = cupy.empty_like(x)
            bufs.append((x, out, mode))
            refs.append([])
            for s in range(sets):
                ins = [host_input(200 + 10 * j + s, r, n, "float16") for r in range(self.world)]
                ref = fc.flash_all_reduce_reference(ins, mode=mode)[0]
                refs[-1].append((cupy.asarray(ins[self.rank]), cupy.asarray(ref)))
        for (x, out, mode), r in zip(bufs, refs):  # warm up (compile) before capture
            x[...] = r[0][0]
            self.comm.backend.all_reduce(x, out, mode, dtype=np.float16)
        self.comm.synchronize()

        def step():
            for x, out, mode in bufs:
                self.comm.backend.all_reduce(x, out, mode, dtype=np.float16)

        replay = capture_graph(step, 1)
        stream = replay.stream
        wrong = 0
        for i in range(replays):
            s = i % sets
            with stream:
                for (x, out, mode), r in zip(bufs, refs):
                    x[...] = r[s][0]
                    out.fill(0)
            replay()
            with stream:
                for (x, out, mode), r in zip(bufs, refs):
                    wrong += int((out.view(cupy.uint16) != r[s][1].view(cupy.uint16)).sum())
        stream.synchronize()
        self.comm.synchronize()
        if not self.agree(wrong == 0):
            self.fail(f"graph replays: {wrong} wrong elements on rank {self.rank}")
        self.log(f"graphs: {replays} replays of {len(specs)} captured calls, all exact")

    # ------------------------------------------------------------------ LL protocol
    def check_ll(self, calls):
        """The data-as-signal kernels: exact sums, sentinel-valued inputs, any grid in any order, graphs."""
        import cupy
        from flashcomm_cupy.backends.cuda_util import capture_graph
        backend = self.comm.backend
        backend.protocol = "ll"
        ran_ll = 0
        try:
            # 1. exact against the reference (sizes around vector and slot boundaries)
            seed = 23
            for n in (1, 2, 7, 8, 9, 31, 127, 1000, 4099, 65_537, 1_000_003, 3_000_001):
                for dtype in DTYPE_NAMES:
                    x = to_device(host_input(seed, self.rank, n, dtype))
                    for algo in ("oneshot", "twoshot"):
                        mode = Mode.make(None, algo=algo)
                        ran_ll += backend.resolve_protocol(x.nbytes, mode, x.itemsize) == "ll"
                        out = cupy.full_like(x, 0x7E00 if x.dtype != cupy.float32 else np.nan)
                        backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
                        self.compare_with_reference(f"ll n={n} {dtype} {algo}", out, n, dtype, mode, seed, algo)
            # 1b. the quantized LL kernels: same bits as the flag kernels and the reference, every codec;
            # 16-element units up to 512-element groups, 32-element units for 1024.
            llq_cases = [("twoshot", 4, g, rotate, sym) for g, rotate, sym in (
                (128, False, False), (128, True, False), (128, False, True), (32, False, False), (512, True, False),
                (1024, False, False), (1024, True, True))]
            llq_cases += [("twoshot", 8, 128, False, False), ("twoshot", (4, 8), 128, True, False),
                          ("oneshot", 4, 128, False, False), ("oneshot", 8, 128, True, False),
                          ("oneshot", 4, 1024, True, False), ("oneshot", 8, 32, False, True)]
            fp16_only = [("oneshot", 6, 64, False, True), ("oneshot", (4, 8), 128, False, False),
                         ("twoshot", 6, 256, False, True)]
            for n in (1, 127, 4099, 65_537, 1_000_003):
                for dtype in DTYPE_NAMES:
                    x = to_device(host_input(seed, self.rank, n, dtype))
                    for algo, bits, g, rotate, sym in llq_cases + (fp16_only if dtype == "float16" else []):
                        mode = Mode.make(bits, g, sym, rotate, algo)
                        ran_ll += backend.resolve_protocol(x.nbytes, mode, x.itemsize) == "ll"
                        out = cupy.full_like(x, 0x7E00 if x.dtype != cupy.float32 else np.nan)
                        backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
                        self.compare_with_reference(f"ll n={n} {dtype} {mode.label}", out, n, dtype, mode, seed, algo)
            # 2. inputs equal to the sentinel's parts, signed zeros and infinities must not hang or leak
            n = 4096
            for dtype in DTYPE_NAMES:
                ins = [host_input(31, r, n, dtype) for r in range(self.world)]
                for r, a in enumerate(ins):
                    bits = a.view(np.uint32 if dtype == "float32" else np.uint16)
                    bits[r::7] = 0xFFFFFFFF if dtype == "float32" else 0xFFFF
                    a[3 + r::11] = -0.0
                    a[5::13] = np.inf if r == 0 else 1.0
                for mode in (Mode.make(None, algo="oneshot"), Mode.make(None, algo="twoshot"),
                             Mode.make(4, algo="twoshot"), Mode.make(4, rotate=True, symmetric=True, algo="twoshot"),
                             Mode.make(4, algo="oneshot"), Mode.make(8, rotate=True, algo="oneshot"),
                             Mode.make(8, algo="twoshot")):
                    algo = mode.algo
                    x = to_device(ins[self.rank])
                    out = cupy.zeros_like(x)
                    backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
                    self.compare_with_reference(f"ll sentinel-valued {dtype} {mode.label}", out, n, dtype, mode, 31,
                                                algo, inputs=ins)
            # 3. a random order of sizes, algorithms and grids, mixed with flag-protocol calls
            rng = np.random.default_rng(5)
            cases = []
            for i, n in enumerate((3, 4096, 50_001, 262_144, 1_048_576)):
                ins = [host_input(300 + i, r, n, "float16") for r in range(self.world)]
                x = cupy.asarray(ins[self.rank])
                for mode in (Mode.make(None, algo="oneshot"), Mode.make(None, algo="twoshot"),
                             Mode.make(4, algo="twoshot"), Mode.make(4, rotate=True, algo="twoshot"),
                             Mode.make(4, algo="oneshot"), Mode.make(8, algo="oneshot"),
                             Mode.make(8, algo="twoshot")):
                    ref = fc.flash_all_reduce_reference(ins, mode=mode)[0]
                    cases.append((x, cupy.empty_like(x), mode, cupy.asarray(ref)))
            flag_case = (cupy.asarray(host_input(399, self.rank, 65_536, "float16")), None, Mode.make(8, algo="oneshot"))
            order = rng.integers(0, len(cases), size=calls)
            shapes = rng.integers(0, 4, size=calls)
            wrong = 0
            for k in range(calls):
                x, out, mode, ref = cases[order[k]]
                threads, blocks, units = ((64, 1, 2), (128, 0, 1), (256, 16, 1), (512, 0, 2))[shapes[k]]
                backend.force_launch = (threads, blocks, units, "ll")
                try:
                    backend.all_reduce(x, out, mode, dtype=np.float16)
                finally:
                    backend.force_launch = None
                if k % 17 == 0:  # a flag-protocol call between LL calls
                    backend.protocol = "flag"
                    try:
                        backend.all_reduce(flag_case[0], cupy.empty_like(flag_case[0]), flag_case[2],
                                           dtype=np.float16)
                    finally:
                        backend.protocol = "ll"
                wrong += int((out.view(cupy.uint16) != ref.view(cupy.uint16)).sum())
            self.comm.synchronize()
            if not self.agree(wrong == 0):
                self.fail(f"ll mixed sequence: {wrong} wrong elements on rank {self.rank}")
            # 4. graph replays of LL calls with fresh inputs each time
            specs = [(4099, "oneshot"), (200_000, "twoshot"), (33_333, "oneshot")]
            bufs = []
            for j, (n, algo) in enumerate(specs):
                sets = []
                for s_ in range(3):
                    ins = [host_input(400 + 10 * j + s_, r, n, "float16") for r in range(self.world)]
                    ref = fc.flash_all_reduce_reference(ins, mode=Mode.make(None, algo=algo))[0]
                    sets.append((cupy.asarray(ins[self.rank]), cupy.asarray(ref)))
                x = cupy.empty(n, dtype=cupy.float16)
                x[...] = sets[0][0]
                bufs.append((x, cupy.empty_like(x), Mode.make(None, algo=algo), sets))
                backend.all_reduce(x, bufs[-1][1], bufs[-1][2], dtype=np.float16)  # compile before capture
            self.comm.synchronize()

            def step():
                for x, out, mode, _ in bufs:
                    backend.all_reduce(x, out, mode, dtype=np.float16)

            replay = capture_graph(step, 1)
            gwrong = 0
            replays = max(10, calls // 10)
            for i in range(replays):
                with replay.stream:
                    for x, out, _, sets in bufs:
                        x[...] = sets[i % 3][0]
                        out.fill(0)
                replay()
                with replay.stream:
                    for x, out, _, sets in bufs:
                        gwrong += int((out.view(cupy.uint16) != sets[i % 3][1].view(cupy.uint16)).sum())
            replay.stream.synchronize()
            self.comm.synchronize()
            if not self.agree(gwrong == 0):
                self.fail(f"ll graph replays: {gwrong} wrong elements on rank {self.rank}")
        finally:
            backend.protocol = "auto"
            backend.force_launch = None
        if not self.agree(ran_ll > 0):
            self.fail("ll: no call resolved to the LL kernels")
        self.log(f"ll: {ran_ll} exact LL cases, {calls} mixed calls, {replays} graph replays")

    def check_staged(self, calls):
        """The staged flag two-shot (fc_twoshot_staged) against the reference: every quantized
        codec pair, both 16-bit dtypes, group sizes, launch shapes that give a block one or
        many tiles, then a random sequence mixing it with the plain flag two-shot."""
        import cupy
        from flashcomm_cupy.backends.gpu import staged_twoshot_smem
        backend = self.comm.backend
        optin = cupy.cuda.runtime.getDeviceProperties(backend.device_id)["sharedMemPerBlockOptin"]
        ran = 0
        wrong_kernel = []

        def run(x, out, mode, dtype, shape):
            nonlocal ran
            backend.force_launch = shape + ("flag", True)
            try:
                backend.all_reduce(x, out, mode, dtype=DTYPES[dtype])
                plan = backend.plan(int(x.size), dtype, mode)
            finally:
                backend.force_launch = None
            staged = plan.algo != "nccl" and plan.smem > 0
            ran += int(staged)
            # it must run wherever its shared memory fits a block (threads as launched)
            threads = plan.threads if plan.algo != "nccl" else shape[0]
            fits = staged_twoshot_smem(2, mode.rs_bits, mode.ag_bits, self.world, threads) <= optin
            if staged != fits:
                wrong_kernel.append(f"{shape} {dtype} {mode.label}: staged={staged}, fits={fits}")

        shapes = ((256, 264, 2), (128, 16, 1), (512, 132, 4), (64, 8, 3))
        for n in (1, 127, 4099, 65_537, 1_000_003):
            for dtype in ("float16", "bfloat16"):
                x = to_device(host_input(21, self.rank, n, dtype))
                for k, bits in enumerate((4, 6, 8, (4, 8), (8, 4), (6, 4))):
                    for rotate, sym in ((False, False), (True, False), (False, True)):
                        mode = Mode.make(bits, 128, sym, rotate, "twoshot")
                        shape = shapes[(k + n) % len(shapes)]
                        out = cupy.full_like(x, 0x7E00)
                        run(x, out, mode, dtype, shape)
                        self.compare_with_reference(f"staged {shape} n={n} {dtype} {mode.label}", out, n, dtype,
                                                    mode, 21, "twoshot")
        x = to_device(host_input(22, self.rank, 300_007, "float16"))
        for g in (32, 64, 256, 512, 1024):
            for shape in shapes:
                mode = Mode.make((4, 8), g, False, True, "twoshot")
                out = cupy.empty_like(x)
                run(x, out, mode, "float16", shape)
                self.compare_with_reference(f"staged group {g} {shape} {mode.label}", out, 300_007, "float16",
                                            mode, 22, "twoshot")
        # non-finite inputs and a bfloat16 range that overflows float32: those groups go NaN, as in the reference
        for dtype in ("float16", "bfloat16"):
            n = 70_001
            ins = [host_input(24, r, n, dtype) for r in range(self.world)]
            ins[0][5] = np.nan
            ins[-1][300] = np.inf
            ins[self.world // 2][1000] = -np.inf
            for x_ in ins:
                x_[2048:2176] = -np.inf  # a whole group of -inf on every rank
            if dtype == "bfloat16":
                ins[0][4096], ins[0][4097] = 3e38, -3e38
            x = to_device(ins[self.rank])
            for bits in (4, 8, (4, 8)):
                for sym in (False, True):
                    mode = Mode.make(bits, 128, sym, False, "twoshot")
                    out = cupy.empty_like(x)
                    run(x, out, mode, dtype, (256, 264, 2))
                    self.compare_with_reference(f"staged non-finite {dtype} {mode.label}", out, n, dtype, mode, 24,
                                                "twoshot", inputs=ins)
        n = 32 << 20  # 64 MiB: many tiles per block
        x = to_device(host_input(23, self.rank, n, "float16"))
        out = cupy.empty_like(x)
        run(x, out, Mode.make(4, algo="twoshot"), "float16", (256, 264, 4))
        self.compare_with_reference("staged 64 MiB int4", out, n, "float16", Mode.make(4, algo="twoshot"), 23,
                                    "twoshot")
        del x, out
        # a random sequence of staged and plain two-shot calls (they share slots and epochs)
        rng = np.random.default_rng(7)
        cases = []
        for i, n in enumerate((5000, 262_144, 1_048_576)):
            ins = [host_input(500 + i, r, n, "float16") for r in range(self.world)]
            for bits in (4, 8, (4, 8)):
                mode = Mode.make(bits, algo="twoshot")
                ref = fc.flash_all_reduce_reference(ins, mode=mode)[0]
                cases.append((cupy.asarray(ins[self.rank]), mode, cupy.asarray(ref)))
        order = rng.integers(0, len(cases), size=calls)
        pick = rng.integers(0, 2 * len(shapes), size=calls)
        wrong = 0
        for k in range(calls):
            x, mode, ref = cases[order[k]]
            out = cupy.empty_like(x)
            shape = shapes[pick[k] % len(shapes)]
            if pick[k] < len(shapes):
                run(x, out, mode, "float16", shape)
            else:
                backend.force_launch = shape + ("flag", False)
                try:
                    backend.all_reduce(x, out, mode, dtype=np.float16)
                finally:
                    backend.force_launch = None
            wrong += int((out.view(cupy.uint16) != ref.view(cupy.uint16)).sum())
        self.comm.synchronize()
        if not self.agree(wrong == 0):
            self.fail(f"staged mixed sequence: {wrong} wrong elements on rank {self.rank}")
        if not self.agree(ran > 0):
            self.fail("staged: no call resolved to the staged kernel")
        if not self.agree(not wrong_kernel):
            self.fail("staged: kernel choice does not follow the shared memory: " + "; ".join(wrong_kernel[:5]))
        self.log(f"staged: {ran} calls ran the staged kernel, {calls} mixed calls")

    def check_large(self, nbytes):
        import cupy
        n = nbytes // 2
        for mode in (Mode.make(4, algo="twoshot"), Mode.make(None, algo="twoshot")):
            x = to_device(host_input(9, self.rank, n, "float16"))
            out = cupy.empty_like(x)
            self.comm.backend.all_reduce(x, out, mode, dtype=np.float16)
            self.compare_with_reference(f"large {nbytes >> 20} MiB {mode.label}", out, n, "float16", mode, 9,
                                        "twoshot")
            del x, out
        self.log(f"large: {nbytes >> 20} MiB checked")


def check_timeout(world_comm, bound_s=2.0, protocol="flag", bits=8, algo="twoshot", staged=False):
    """The last rank never calls all_reduce; the others must raise within the bound."""
    import cupy
    comm = fc.Communicator(world_comm, backend="gpu", timeout_s=bound_s, protocol=protocol)
    rank, last = comm.rank, comm.world_size - 1
    ok = True
    if comm.backend_name != "gpu":
        return True, "skipped (no flash backend)"
    if staged:
        comm.backend.force_launch = (256, 264, 1, "flag", True)
    msg = ""
    if rank != last:
        x = cupy.ones(1 << 16, dtype=cupy.float16)
        t0 = time.perf_counter()
        comm.all_reduce(x, bits=bits, algo=algo)
        try:
            comm.synchronize()
            ok = False
            msg = "no error raised"
        except Exception as exc:  # FlashTimeoutError
            dt = time.perf_counter() - t0
            msg = str(exc)
            ok = type(exc).__name__ == "FlashTimeoutError" and f"rank {last}" in msg and dt < bound_s + 5.0
            msg = f"{dt:.1f} s: {msg}"
    comm.mpi_comm.Barrier()
    comm.close()
    return ok, msg


def run_plan(ck: Checker, plan, only=()):
    """Run each ``(name, fn)`` of ``plan`` (those in ``only`` when given), logging its time;
    an exception aborts the job (the other ranks may be inside a collective)."""
    from mpi4py import MPI
    for name, fn in plan:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:
            ck.fail(f"{name}: exception on rank {ck.rank}:\n{traceback.format_exc()}")
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(2)
        ck.log(f"  [{name}] {time.perf_counter() - t0:.1f} s")


#: the sections of the checks, in the order they run
SECTIONS = ("codec", "exact", "groups", "api", "many", "graphs", "large", "ll", "staged")
#: the timeout checks, after the sections: (protocol, bits, algo, staged)
TIMEOUT_CASES = (("flag", 8, "twoshot", False), ("ll", None, "oneshot", False), ("ll", 4, "twoshot", False),
                 ("ll", 8, "oneshot", False), ("flag", 4, "twoshot", True))


def timeout_label(case) -> str:
    protocol, bits, algo, staged = case
    return f"{protocol}{' staged' if staged else ''}, bits {bits}, {algo}"


class Sections:
    """The checks of this script by name on one communicator (kernels compiled once), for main()
    and for tests/gpu/test_flash_gpu.py.  Collective: every rank runs the same sections in order."""

    def __init__(self, quick=False, calls=10_000, replays=1000, large_mib=256):
        from mpi4py import MPI
        self.world_comm = MPI.COMM_WORLD
        self.comm = fc.Communicator(MPI.COMM_WORLD, backend="gpu")
        self.ck = ck = Checker(self.comm)
        self.failures = ck.failures
        ck.log(f"flashcomm GPU checks: {self.comm.world_size} ranks, backend {self.comm.backend_name}")
        if self.comm.backend_name != "gpu":  # (another backend has no flash kernels to compile or check)
            ck.fail(f"flash GPU backend unavailable (fell back to {self.comm.backend_name})")
        else:
            t0 = time.perf_counter()
            self.comm.backend.precompile()
            ck.log(f"kernels compiled/loaded in {time.perf_counter() - t0:.1f} s")
        sizes = [1, 2, 31, 127, 1000, 4099, 65_537, 1_000_003] if not quick else [1, 127, 4099, 65_537]
        self.plan = [
            ("codec", ck.check_codec_bytes),
            ("exact", lambda: ck.check_exact(sizes)),
            ("groups", ck.check_group_sizes),
            ("api", ck.check_api),
            ("many", lambda: ck.check_many_calls(calls if not quick else 1000)),
            ("graphs", lambda: ck.check_graph_replays(replays if not quick else 100)),
            ("large", lambda: ck.check_large(large_mib << 20)),
            ("ll", lambda: ck.check_ll(2000 if not quick else 300)),
            ("staged", lambda: ck.check_staged(1000 if not quick else 200)),
        ]
        assert tuple(name for name, _ in self.plan) == SECTIONS

    def run(self, name: str) -> None:
        """One section (an exception propagates: the caller decides how the job ends)."""
        t0 = time.perf_counter()
        dict(self.plan)[name]()
        self.ck.log(f"  [{name}] {time.perf_counter() - t0:.1f} s")

    def timeout(self, case) -> None:
        """One of TIMEOUT_CASES, on a communicator of its own (this one is closed first, as in main())."""
        self.close()
        what = timeout_label(case)
        protocol, bits, algo, staged = case
        ok, msg = check_timeout(self.world_comm, protocol=protocol, bits=bits, algo=algo, staged=staged)
        ok_all = all(self.world_comm.allgather(ok))
        if self.ck.rank == 0:
            print((f"timeout ({what}): OK " if ok_all else f"FAIL timeout ({what}): ") + msg, flush=True)
        if not ok_all:
            self.ck.failures.append(f"timeout ({what}): " + (msg if not ok else "failed on another rank"))

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()
            self.comm = None


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller sweep (for 2- and 3-rank runs)")
    p.add_argument("--only", default="", help="comma list of checks")
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--replays", type=int, default=1000)
    p.add_argument("--large-mib", type=int, default=256)
    args = p.parse_args(argv)
    from mpi4py import MPI
    sections = Sections(args.quick, args.calls, args.replays, args.large_mib)
    ck = sections.ck
    only = set(filter(None, args.only.split(",")))
    t_all = time.perf_counter()
    if not ck.failures:
        run_plan(ck, sections.plan, only)
    sections.close()
    if not ck.failures and (not only or "timeout" in only):
        for case in TIMEOUT_CASES:
            sections.timeout(case)
    failures = MPI.COMM_WORLD.allreduce(len(ck.failures))
    if ck.rank == 0:
        print(f"{'OK' if failures == 0 else 'FAILED'}: {ck.count} exactness cases, {failures} failures, "
              f"{time.perf_counter() - t_all:.0f} s", flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
