"""The flash GPU backend: fused one-shot / two-shot kernels over a shared workspace.

Every rank's workspace is shared by a transport (:mod:`.transport`: CUDA IPC
over legacy or virtual-memory handles, or host memory), verified by real peer
stores before first use; NCCL rides along for ``algo="nccl"`` and as the
fallback when no transport works (:func:`make_gpu_backend`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import warnings

import numpy as np

from .. import _kernels, _mpi, settings, tuning
from ..config import Mode
from ..dtypes import KERNEL_DTYPE_CODE, dtype_name
from ..errors import FlashTimeoutError, resolve_timeout
from .cuda_util import CudaBackend, select_device
from .ipc import MAX_RANKS, PeerAccessError, WorkspaceLayout
from .nccl import _NCCL_DTYPE, NcclBackend, NcclCommunicatorHandle
from .transport import describe as describe_transport, open_workspace, resolve_transport

ELEMS_PER_THREAD = _kernels.DEFAULT_UNIT_ELEMS  # FC_ELEMS of the flag and lossless LL kernels
#: The quantized LL kernels run 16-element units wherever the group allows (g <= 32 x 16):
#: half as long a chain per lane, twice the lanes (benchmarks/NOTES.md v18).
LLQ_UNIT_ELEMS = 16
#: threads per block of the quantized LL kernels by unit size (FC_LLQ_THREADS in fc_allreduce.cu)
LLQ_MAX_THREADS = {16: 256, 32: 128}
#: registers of one SM (sm_70 to sm_90): every launched LL block must be resident, two per SM
SM_REGISTERS = 65536
#: bytes of one unit in the quantized LL form (FcLLq in fc_ll.cuh), by (unit elements, bits): code
#: words paired with metadata words, rounded up to whole 16-byte vectors
LLQ_UNIT_BYTES = {(16, 4): 16, (16, 6): 32, (16, 8): 32, (32, 4): 32, (32, 6): 48, (32, 8): 64}


def llq_threads(elems: int, itemsize: int, algo: str, rs_bits: int, ag_bits: int) -> int:
    """Most threads per block of a quantized LL kernel such that two blocks fit an SM.

    The launch bounds allow up to LLQ_MAX_THREADS; ptxas keeps every 16-element
    build at <= 128 registers except the two-shots with an INT8 step (161-169
    registers since the poison protocol's per-lane failure state;
    the float32 one was at 157-159 before), of which only one 256-thread block
    fits an SM, so those run 128 threads.  tests/test_kernels_compile.py checks
    this against ptxas.
    """
    if elems == 16 and algo == "twoshot" and 8 in (rs_bits, ag_bits):
        return 128
    return LLQ_MAX_THREADS[elems]


def llq_unit_elems(group_size: int) -> int:
    """Unit size of the quantized LL kernels for this group size (a group spans at most a warp)."""
    return LLQ_UNIT_ELEMS if group_size <= 32 * LLQ_UNIT_ELEMS else ELEMS_PER_THREAD


#: fc_warp_gather's per-warp stage, in 16-byte vectors (FC_STAGE_VECS in fc_common.cuh)
STAGE_VECS = 144


def _padded(chunks: int) -> int:
    return chunks + chunks // 8  # one pad vector every eight (fc_stage_index)


def staged_unit_chunks(bits: int, elems: int = ELEMS_PER_THREAD) -> int:
    """16-byte vectors of a warp's staged quantized unit (FcStaged<BITS>::CHUNKS in fc_quant.cuh)."""
    lo_words = elems // 4 if bits == 8 else elems // 8
    hi_words = elems // 16 if bits == 6 else 0
    return _padded(8 * lo_words) + _padded(8 * hi_words) + 16


def staged_twoshot_smem(itemsize: int, rs_bits: int, ag_bits: int, world: int, threads: int,
                        elems: int = ELEMS_PER_THREAD) -> int:
    """Dynamic shared memory (bytes) of the staged flag two-shot: per warp, the stage and
    two buffers of my input's unit plus one unit per other rank (FcStagedTwoshot in fc_allreduce.cu)."""
    own = _padded(32 * elems * itemsize // 16)
    src = max(staged_unit_chunks(rs_bits, elems), staged_unit_chunks(ag_bits, elems))
    return threads // 32 * (STAGE_VECS + 2 * (own + (world - 1) * src)) * 16


try:  # cuLaunchKernel with a prebuilt parameter array: the eager path's host cost is the launch
    from cupy_backends.cuda.api.driver import launchKernel as _launch_kernel
except Exception:  # pragma: no cover - older CuPy: launch through RawKernel.__call__
    _launch_kernel = None


def _resident_blocks(fn, threads: int, smem: int) -> int:
    """Blocks of ``fn`` that fit one SM at once with ``smem`` dynamic shared bytes (0: none fit).

    Raises the kernel's dynamic shared memory limit to ``smem`` first (past 48 KiB
    it must be asked for); a device that cannot give that much yields 0.
    """
    from cupy_backends.cuda.api import driver
    try:
        if fn.max_dynamic_shared_size_bytes < smem:
            fn.max_dynamic_shared_size_bytes = smem
        return int(driver.occupancyMaxActiveBlocksPerMultiprocessor(int(getattr(fn, "kernel", fn).ptr), threads,
                                                                     smem))
    except Exception:  # more than the device allows
        return 0


def _external_stream(stream_ptr: int):
    import cupy
    return cupy.cuda.ExternalStream(stream_ptr)


class _Plan:
    """A prepared launch: kernel, grid, block and argument block (FcArgs bytes).

    ``ptrs`` views the argument block as uint64 (in/out pointers at [0], [1]).
    ``func`` (a CUfunction, or 0) and ``params`` (a one-entry kernelParams array
    pointing at the argument block) let the eager path call cuLaunchKernel
    directly instead of marshalling the arguments in Python on every call.
    """

    __slots__ = ("fn", "grid", "block", "args", "ptrs", "func", "params", "params_ptr", "smem")

    def __init__(self, fn, blocks, threads, args, smem=0):
        self.fn, self.grid, self.block, self.args = fn, (blocks,), (threads,), args
        self.smem = int(smem)  # dynamic shared memory bytes (the staged two-shot)
        self.ptrs = args.view(np.uint64)
        self.func = 0
        if _launch_kernel is not None:
            try:
                self.func = int(getattr(fn, "kernel", fn).ptr)
            except Exception:
                self.func = 0
        self.params = np.array([args.ctypes.data], dtype=np.uintp)
        self.params_ptr = int(self.params.ctypes.data)


class FlashGpuBackend(CudaBackend):
    """Flash All-Reduce on the GPUs of one host, one process per GPU.

    Options: ``device`` (GPU ordinal; default local rank), ``timeout_s``
    (bound of every spin-wait; default ``$FLASHCOMM_TIMEOUT_S`` or 30),
    ``validate`` (all-gather sizes and modes before every call and raise on
    mismatch), ``max_blocks`` and ``max_threads`` (workspace shape),
    ``tuning`` (path of a dispatch table), ``protocol`` ("auto" follows the
    table; "flag" or "ll" forces that signalling protocol wherever it applies:
    LL serves every mode while the message fits the LL slots, see :mod:`flashcomm_cupy.tuning`;
    default ``$FLASHCOMM_PROTOCOL`` or "auto"), ``transport`` ("auto", "ipc" or
    "host": where the workspaces live, see :mod:`.transport`; default
    ``$FLASHCOMM_TRANSPORT`` or "auto").  With ``transport="host"`` the NCCL
    baseline is created with ``NCCL_P2P_DISABLE=1``, so it runs in the same
    configuration (through host shared memory).

    Every rank must build the backend with the same settings (checked at
    construction) and make the same calls in the same order, each on one
    stream after the previous one: a call's kernel must not start before the
    previous call's kernel on that rank has finished (the slot-reuse argument
    of the flag and LL protocols rests on it), as with NCCL communicators.
    """

    name = "gpu"
    baseline_algo = "nccl"

    def __init__(self, comm, device=None, timeout_s=None, validate=False, max_blocks=None, max_threads=512,
                 tuning_path=None, slot_bytes=48 << 10, protocol=None, transport=None):
        import cupy
        self.mpi_comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        if self.world_size > 8:
            raise ValueError(f"flashcomm supports up to 8 ranks per host, got {self.world_size}")
        if max_threads not in (64, 128, 256, 512):
            raise ValueError("max_threads must be 64, 128, 256 or 512")
        self.device_id = select_device(comm, device)
        self.validate = bool(validate)
        self.timeout_s = resolve_timeout(timeout_s)
        self.max_threads = int(max_threads)
        self.slot_bytes = int(slot_bytes)
        if self.slot_bytes % 16:
            raise ValueError(f"slot_bytes must be a multiple of 16 (16-byte vector accesses), got {slot_bytes}")
        props = cupy.cuda.runtime.getDeviceProperties(self.device_id)
        self.sm_count = int(props["multiProcessorCount"])
        if max_blocks is None:
            # Two co-resident 256-thread blocks per SM (<= 128 registers each): while one
            # waits for its peers the other computes.  All blocks must be resident at
            # once, since block b waits for block b of every peer.
            max_blocks = 2 * self.sm_count
        # The staged two-shot sizes its grid by an occupancy query on this GPU, and every
        # rank must launch the same grid: it runs only where all ranks have the same GPU.
        device_kind = tuple(props.get(k) for k in ("name", "major", "minor", "multiProcessorCount",
                                                    "sharedMemPerMultiprocessor", "regsPerMultiprocessor"))
        self.staged_ok = len(set(comm.allgather(device_kind))) == 1
        self.table = tuning.load(tuning_path)
        #: (threads, blocks, units[, protocol[, staged]]) forced on every flash launch; set only by tuning sweeps
        self.force_launch = None
        protocol = settings.resolve(settings.PROTOCOL, protocol, "protocol")
        #: "auto" (the table's choice), or "flag" / "ll" forced where they apply
        self.protocol = protocol
        #: "driver": cuLaunchKernel with the plan's prebuilt parameters; "cupy": RawKernel.__call__
        self.launcher = "driver"
        #: "auto", "ipc" or "host" as asked; ``self.ws.transport`` says which one runs
        self.transport = resolve_transport(transport)
        _mpi.agree(comm, {"max_blocks": int(max_blocks), "max_threads": self.max_threads,
                          "slot_bytes": self.slot_bytes, "protocol": self.protocol, "transport": self.transport,
                          "tuning table": self.table.digest()}, "flash backend settings")
        self._plans = {}
        self._closed = True  # until every resource below exists
        self.ws = None
        self._err_ptr = 0
        #: the NCCL baseline runs without P2P (through host memory), like the host transport
        self.nccl_p2p_disabled = self.transport == "host"
        with _env("NCCL_P2P_DISABLE", "1") if self.nccl_p2p_disabled else contextlib.nullcontext():
            self.nccl = NcclCommunicatorHandle(comm)
        try:
            self._init_workspace(comm, max_blocks)
        except BaseException:  # IPC refused, out of memory, a peer's failure: leave nothing behind
            self._release()
            raise
        self._closed = False

    def _init_workspace(self, comm, max_blocks):
        import cupy
        # Launches pick threads and units so one tile fits a slot (see _launch).
        # 48 KiB x 264 blocks x 4 regions is 200 MB per rank at 4 ranks.
        layout = WorkspaceLayout(self.world_size, int(max_blocks),
                                 max(self.slot_bytes, 2 * ELEMS_PER_THREAD * 128 + 256))
        self._err_ptr = cupy.cuda.runtime.hostAlloc(64, 0x3)  # portable | mapped
        ctypes.memset(self._err_ptr, 0, 64)
        self._err = (ctypes.c_uint32 * len(_kernels.ERROR_FIELDS)).from_address(self._err_ptr)
        self.ws = open_workspace(comm, layout, self.device_id, self.transport)
        self._args = np.zeros(1, dtype=_kernels.ARGS_DTYPE)
        a = self._args[0]
        a["peers"][: self.world_size] = self.ws.peer_ptrs
        # The kernels' out-of-line failure path poisons every rank through this table (fc_poison_all).
        bases = np.zeros(MAX_RANKS, dtype=np.uint64)
        bases[: self.world_size] = self.ws.peer_ptrs
        cupy.cuda.runtime.memcpy(self.ws.peer_ptrs[self.rank] + layout.poison_peers_off, bases.ctypes.data,
                                 bases.nbytes, cupy.cuda.runtime.memcpyDefault)
        a["err"] = self._err_ptr
        layout.fill_args(a)
        a["rank"], a["world"] = self.rank, self.world_size
        a["timeout_ns"] = int(self.timeout_s * 1e9)

    def precompile(self, dtypes=("float16", "bfloat16", "float32"),
                   bits=((None, None), (4, 4), (6, 6), (8, 8), (4, 8))):
        """Compile kernel specialisations, spread over the ranks (collective).

        CuPy caches binaries on disk, so each rank compiles 1/world of them
        and then loads the rest from the cache.
        """
        jobs = [(KERNEL_DTYPE_CODE[d], rs or 0, ag or 0, _kernels.DEFAULT_UNIT_ELEMS) for d in dtypes for rs, ag in bits]
        jobs += [(dt, rs, ag, LLQ_UNIT_ELEMS) for dt, rs, ag, _ in jobs if rs]  # the quantized LL kernels
        for i, job in enumerate(jobs):
            if i % self.world_size == self.rank:
                _kernels.module(*job).get_function("fc_twoshot")
        self.mpi_comm.Barrier()

    # ------------------------------------------------------------------ interface
    def supported_algos(self):
        return ("oneshot", "twoshot", "nccl")

    def resolve_algo(self, nbytes: int, mode: Mode, itemsize: int = 2) -> str:
        return self._resolve(max(1, nbytes // itemsize), itemsize, mode)[0].algo

    def resolve_protocol(self, nbytes: int, mode: Mode, itemsize: int = 2) -> str:
        """"ll", "flag" or "staged" (the flag two-shot staging its reads) for the flash
        kernels that would run; "" when NCCL runs."""
        n = max(1, nbytes // itemsize)
        choice, ll = self._resolve(n, itemsize, mode)
        if choice.algo == "nccl":
            return ""
        if ll is not None:
            return "ll"
        if choice.staged and itemsize == 2:  # float16 and bfloat16 plans alike
            return "staged" if self._plan(n, "float16", mode).smem else "flag"
        return "flag"

    def _resolve(self, n: int, itemsize: int, mode: Mode):
        """(choice, LL launch or None) for n elements: an LL choice the LL kernels
        cannot serve falls back to the table's best flag-protocol choice."""
        choice = self._choose(n * itemsize, mode)
        if choice.algo == "nccl":
            return choice, None
        ll = self._ll_shape(choice, n, itemsize, mode)
        if ll is None and choice.protocol == "ll":
            choice = self._choose(n * itemsize, mode, flag_only=True)
        return choice, ll

    def _choose(self, nbytes: int, mode: Mode, flag_only: bool = False) -> tuning.Choice:
        if self.protocol == "flag":
            flag_only = True  # the table's best flag choice, not the LL row's shape with flags
        choice = self._choose_table(nbytes, mode, flag_only)
        if self.protocol == "ll" and choice.protocol != "ll" and choice.algo != "nccl" and not flag_only:
            choice = dataclasses.replace(choice, protocol="ll")
        return choice

    def _choose_table(self, nbytes: int, mode: Mode, flag_only: bool = False) -> tuning.Choice:
        if self.force_launch is not None and mode.algo in ("oneshot", "twoshot"):
            forced = tuning.Choice(mode.algo, *self.force_launch)
            return dataclasses.replace(forced, protocol="flag") if flag_only else forced
        wide = not mode.lossless and max(mode.rs_bits, mode.ag_bits) > 4
        auto = self.table.choose(self.world_size, nbytes, mode.lossless, flag_only, wide, self.ws.transport)
        if mode.algo == "auto":
            if auto.algo == "nccl" and not mode.lossless:
                return tuning.heuristic(self.world_size, nbytes, False)
            return auto
        if mode.algo == "mpi":
            raise ValueError("algo='mpi' is the CPU backend's baseline; use 'nccl' on GPUs")
        if mode.algo == auto.algo:
            return auto
        rule = tuning.heuristic(self.world_size, nbytes, mode.lossless)
        return tuning.Choice(mode.algo, rule.threads, 0, 1, "flag" if flag_only else rule.protocol)

    def all_reduce(self, x, out, mode: Mode, stream=None, dtype=None):
        import cupy
        self._raise_if_failed()
        dt = np.dtype(dtype) if dtype is not None else np.dtype(x.dtype)
        name = dtype_name(dt)
        n = int(x.size)
        stream = stream or cupy.cuda.get_current_stream()
        if self.validate:
            self._validate(n, name, mode)
        if n == 0:
            return out
        plan = self._plan(n, name, mode)
        if plan is None:  # "auto" (or the caller) picked NCCL
            self.nccl.all_reduce(x.data.ptr, out.data.ptr, n, name, stream.ptr)
            return out
        if x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0:
            self._launch(plan, x.data.ptr, out.data.ptr, stream.ptr)
            return out
        # The kernels use 16-byte vector loads: run on aligned copies.  They are made, used and
        # freed on ``stream``, so CuPy's pool (per stream) hands them out again only to work
        # queued after this kernel.  A graph would keep their pointers past that: refuse capture.
        if cupy.cuda.runtime.streamIsCapturing(stream.ptr):
            raise ValueError("flashcomm: x and out must be 16-byte aligned inside CUDA-graph capture "
                             f"(x at {x.data.ptr:#x}, out at {out.data.ptr:#x}): the aligned copies an "
                             "eager call makes would be freed while the graph still uses them")
        with stream:
            src = x if x.data.ptr % 16 == 0 else x.copy()
            dst = out if out.data.ptr % 16 == 0 else cupy.empty_like(out)
            self._launch(plan, src.data.ptr, dst.data.ptr, stream.ptr)
            if dst is not out:
                out[...] = dst
        return out

    def _launch(self, plan, x_ptr: int, out_ptr: int, stream_ptr: int) -> None:
        """Launch ``plan`` on 16-byte aligned device pointers (the hot path of every call)."""
        plan.ptrs[0] = x_ptr
        plan.ptrs[1] = out_ptr
        # The driver copies the argument block at launch, so reusing it is safe.
        if plan.func and self.launcher == "driver":
            _launch_kernel(plan.func, plan.grid[0], 1, 1, plan.block[0], 1, 1, plan.smem, stream_ptr,
                           plan.params_ptr, 0)
        else:
            plan.fn(plan.grid, plan.block, (plan.args,), stream=_external_stream(stream_ptr), shared_mem=plan.smem)

    def eager_launcher(self, n: int, name: str, mode: Mode):
        """``launch(x_ptr, out_ptr, stream_ptr)`` running what ``all_reduce`` runs for ``n``
        elements of ``name`` in ``mode`` on 16-byte aligned pointers, for the communicator's
        eager cache (:mod:`flashcomm_cupy._eager`); None where every call must go through
        ``all_reduce`` (``validate``, forced launch shapes, the CuPy launcher, empty arrays).

        The launch checks the error record first, as ``all_reduce`` does, and returns False
        without launching once a setting that picks the plan (``protocol``, ``force_launch``)
        changed since: the caller then takes ``all_reduce``.
        """
        if self.validate or self.force_launch is not None or self.launcher != "driver" or n == 0:
            return None
        plan = self._plan(n, name, mode)
        err, check, protocol = self._err, self._raise_if_failed, self.protocol

        def unusable():
            if self._closed or err[0]:
                check()
            return self.force_launch is not None or self.protocol != protocol
        if plan is None:
            nccl_call, count, nccl_dtype = self.nccl.comm.allReduce, n, _NCCL_DTYPE[name]

            def launch_nccl(x_ptr, out_ptr, stream_ptr):
                if self._closed or err[0] or self.force_launch is not None or self.protocol != protocol:
                    if unusable():
                        return False
                nccl_call(x_ptr, out_ptr, count, nccl_dtype, 0, stream_ptr)
                return True
            return launch_nccl
        if not plan.func:
            return None
        ptrs = (ctypes.c_uint64 * 2).from_address(plan.args.ctypes.data)
        func, gx, bx, smem, params = plan.func, plan.grid[0], plan.block[0], plan.smem, plan.params_ptr
        keep = plan  # the closure owns the argument block ``ptrs`` points into

        def launch(x_ptr, out_ptr, stream_ptr):
            if self._closed or err[0] or self.force_launch is not None or self.protocol != protocol:
                if unusable():
                    return False
            ptrs[0] = x_ptr
            ptrs[1] = out_ptr
            _launch_kernel(func, gx, 1, 1, bx, 1, 1, smem, stream_ptr, params, 0)
            return True
        launch.plan = keep
        return launch

    def _plan(self, n, name, mode):
        """Cached launch for (n, dtype, mode): kernel, grid, block and argument block.

        Eager calls are bound by host time (the kernel of a small message takes
        a few microseconds), so everything but the two array pointers is worked
        out once.  None means NCCL.
        """
        key = (n, name, mode, self.force_launch, self.protocol)
        plan = self._plans.get(key, False)
        if plan is not False:
            return plan
        choice, ll = self._resolve(n, np.dtype(name).itemsize, mode)
        if choice.algo == "nccl":
            plan = None
        else:
            args = self._args.copy()
            a = args[0]
            a["n"] = n
            a["group"] = mode.group_size
            a["flags"] = (_kernels.FLAG_ROTATE if mode.rotate else 0) | (_kernels.FLAG_SYM if mode.symmetric else 0)
            a["rot_norm"] = np.float32(1.0 / np.sqrt(float(mode.group_size)))
            dt = KERNEL_DTYPE_CODE[name]
            smem = 0
            if ll is not None and mode.lossless:
                threads, blocks, a["seg_elems"], a["ll_tile"] = ll
                fn = _kernels.function("fc_ll_oneshot" if choice.algo == "oneshot" else "fc_ll_twoshot", dt, 0, 0)
            elif ll is not None:
                threads, blocks, a["seg_elems"], a["units"] = ll
                fn = _kernels.function("fc_llq_oneshot" if choice.algo == "oneshot" else "fc_llq_twoshot", dt,
                                       mode.rs_bits, mode.ag_bits, llq_unit_elems(mode.group_size))
            else:
                threads, blocks, a["seg_elems"], a["units"] = self._launch_shape(choice, n, name, mode)
                staged = self._staged_launch(choice, name, mode, threads)
                if staged is not None:
                    fn, per_sm, smem = staged
                    blocks = min(blocks, self.sm_count * per_sm)
                else:
                    fn = _kernels.function("fc_twoshot" if choice.algo == "twoshot" else "fc_oneshot", dt,
                                           mode.rs_bits, mode.ag_bits)
            plan = _Plan(fn, blocks, threads, args, smem)
        if len(self._plans) >= 1024:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _staged_launch(self, choice, name, mode, threads):
        """(kernel, blocks per SM, dynamic shared bytes) of the staged flag two-shot at
        ``threads`` per block, or None where it does not apply (not asked for, lossless,
        float32, ranks on different kinds of GPU, or not even one block fits an SM): the plain
        flag two-shot runs then.

        Its shared memory grows with the world size and the codec, so how many
        blocks fit an SM at once comes from the occupancy calculator: every
        launched block must be resident (block b waits for block b of every peer).
        """
        itemsize = np.dtype(name).itemsize
        if not (choice.staged and choice.algo == "twoshot" and not mode.lossless and itemsize == 2
                and self.staged_ok):
            return None
        fn = _kernels.function("fc_twoshot_staged", KERNEL_DTYPE_CODE[name], mode.rs_bits, mode.ag_bits)
        smem = staged_twoshot_smem(itemsize, mode.rs_bits, mode.ag_bits, self.world_size, threads)
        per_sm = _resident_blocks(fn, threads, smem)
        if per_sm < 1:
            return None
        return fn, per_sm, smem

    def _launch_shape(self, choice, n, name, mode):
        """(threads, blocks, segment elements, units per thread) for one call.

        Segments are whole groups (32-element units when lossless); a tile of
        threads x 32 x units elements (the flag kernels' unit size) must fit one
        workspace slot, and a 512-thread block fills an SM, so only half as many
        of those are resident.
        """
        quantum = ELEMS_PER_THREAD if mode.lossless else mode.group_size
        quanta = -(-n // quantum)
        if choice.algo == "twoshot":
            seg = -(-quanta // self.world_size) * quantum
        else:
            seg = quanta * quantum
        per_elem = np.dtype(name).itemsize if mode.lossless else max(
            mode.rs_codec.wire_bytes_per_element(), mode.ag_codec.wire_bytes_per_element())
        room = self.ws.layout.slot_bytes - 256
        threads = min(max(choice.threads, quantum // ELEMS_PER_THREAD, 64), self.max_threads)
        while threads > 64 and threads * ELEMS_PER_THREAD * per_elem > room:
            threads //= 2  # e.g. lossless fp32 at 512 threads does not fit a 48 KiB slot
        fit = int(room // (threads * ELEMS_PER_THREAD * per_elem))
        units = max(1, min(choice.units, fit, -(-seg // (threads * ELEMS_PER_THREAD))))
        resident = self.ws.layout.max_blocks // (2 if threads > 256 else 1)
        limit = resident if choice.blocks <= 0 else min(choice.blocks, resident)
        tiles = -(-seg // (threads * ELEMS_PER_THREAD * units))
        return threads, max(1, min(limit, tiles)), seg, units

    def _ll_shape(self, choice, n, itemsize, mode):
        """The launch of the LL kernels for this call, or None where they do not apply.

        Lossless: (threads, blocks, segment elements, vectors per block tile).
        A segment (the whole message for one-shot, one owner's share for
        two-shot) is whole 16-byte vectors.  Quantized: see :meth:`_llq_shape`.
        Either way every tile fits an LL slot, every block is resident, and
        every launched block gets a non-empty tile, so each block index
        exchanges data with every peer in every call (the LL slot-reuse
        argument in fc_ll.cuh needs that).
        """
        if choice.protocol != "ll":
            return None
        if not mode.lossless:
            return self._llq_shape(choice, n, mode, itemsize)
        per = 16 // itemsize
        share = n if choice.algo == "oneshot" else -(-n // self.world_size)
        vecs = -(-share // per)
        layout = self.ws.layout
        threads = min(max(choice.threads, 64), self.max_threads)
        resident = layout.max_blocks // (2 if threads > 256 else 1)
        slot_vecs = layout.ll_slot_bytes // 16
        fewest = -(-vecs // slot_vecs)
        if fewest > resident:
            return None
        want = choice.blocks if choice.blocks > 0 else -(-vecs // threads)
        blocks = max(fewest, min(want, resident, vecs))
        tile = -(-vecs // blocks)
        return threads, -(-vecs // tile), vecs * per, tile

    def _llq_shape(self, choice, n, mode, itemsize: int = 2):
        """(threads, blocks, segment elements, units per thread) of the quantized LL kernels, or None.

        One-shot: segment = the whole message (only the reduce-scatter codec is used).
        Two-shot: segments of whole groups as in the flag two-shot (the reference's
        SegmentLayout).  Any codec: INT6/INT8 units take 1.5-2x the bytes of INT4 in LL form
        (2 bytes an element with 16-element units), so the table's ``quantized_wide`` entry
        decides where they run LL.  Block b handles tile b (threads x E x units elements,
        E = :func:`llq_unit_elems`) of every segment, and only one tile per block and call exists.
        """
        layout = self.ws.layout
        elems = llq_unit_elems(mode.group_size)
        bits = (mode.rs_bits,) if choice.algo == "oneshot" else (mode.rs_bits, mode.ag_bits)
        wire = max(LLQ_UNIT_BYTES[elems, b] for b in bits)
        slot_units = layout.ll_slot_bytes // wire
        threads = min(max(choice.threads, 64), llq_threads(elems, itemsize, choice.algo, mode.rs_bits, mode.ag_bits))
        if threads > slot_units:
            return None
        quantum = mode.group_size
        groups = -(-n // quantum)
        seg = (groups if choice.algo == "oneshot" else -(-groups // self.world_size)) * quantum
        seg_units = seg // elems
        most = slot_units // threads
        fewest = -(-seg_units // (threads * layout.max_blocks))  # more blocks than that cannot be resident
        units = max(1, min(max(choice.units, fewest), most, -(-seg_units // threads)))
        blocks = -(-seg_units // (threads * units))
        if blocks > layout.max_blocks:  # two blocks of llq_threads() fit an SM: max_blocks are resident
            return None
        return threads, blocks, seg, units

    def _validate(self, n, name, mode):
        _mpi.agree(self.mpi_comm, _mpi.call_description(n, name, mode), "all_reduce arguments")

    def reset_ll_slots(self):
        """Fill every LL slot with the sentinel again (collective).

        Only for profiling builds (``FC_PROFILE_NO_WAIT``), whose readers empty
        slots before the peers' data lands, leaving stale payloads behind.
        """
        import cupy
        dev = cupy.cuda.Device(self.device_id)
        dev.synchronize()
        self.mpi_comm.Barrier()  # no peer is still writing into my slots
        lay = self.ws.layout
        cupy.cuda.runtime.memset(self.ws.ptr + lay.ll_off, 0xFF, lay.ll_bytes)
        dev.synchronize()
        self.mpi_comm.Barrier()

    def _raise_if_failed(self):
        if self._closed:
            raise RuntimeError("this flashcomm GPU backend is closed")
        if self._err[0]:
            raise error_from_record(dict(zip(_kernels.ERROR_FIELDS, self._err)), self.timeout_s)

    def check(self):
        """Raise the recorded error, if a call of this communicator failed (no synchronization)."""
        self._raise_if_failed()

    def wait(self, stream):
        """Wait (bounded) until the work queued on ``stream`` finished, then :meth:`check`."""
        self.nccl.wait_streams([stream.ptr], self.timeout_s)
        self._raise_if_failed()

    def synchronize(self):
        import cupy
        self.nccl.wait_streams(None, self.timeout_s)  # NCCL-routed calls, bounded (aborts NCCL past it)
        cupy.cuda.Device(self.device_id).synchronize()
        self._raise_if_failed()

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self):
        """Free whatever exists of the workspace, the NCCL communicator and the error record."""
        import cupy
        try:
            cupy.cuda.Device(self.device_id).synchronize()
        except Exception:
            pass
        if self.ws is not None:
            self.ws.close()
            self.ws = None
        if self.nccl is not None:
            self.nccl.close()
        if self._err_ptr:
            cupy.cuda.runtime.freeHost(self._err_ptr)
            self._err_ptr = 0
            self._err = (ctypes.c_uint32 * len(_kernels.ERROR_FIELDS))()  # no dangling view of freed memory

    def describe(self):
        info = super().describe()
        peers = self.mpi_comm.allgather(self.ws.peer_ptrs and [True] * self.world_size)
        info.update(workspace_bytes=self.ws.layout.total, max_blocks=self.ws.layout.max_blocks,
                    timeout_s=self.timeout_s, tuning_table=self.table.describe(), peer_access=peers,
                    transport=describe_transport(self.ws), nccl_p2p_disabled=self.nccl_p2p_disabled)
        return info


def error_from_record(rec: dict, timeout_s: float) -> FlashTimeoutError:
    """The exception for a non-empty error record (``_kernels.ERROR_FIELDS`` -> values)."""
    me, peer, late = rec["rank"], rec["peer"], rec["late"]
    tail = (" Every rank of this communicator raises this error (its workspace is poisoned) and every later call"
            " writes NaN; close it and create a new one.")
    if rec["code"] == _kernels.ERR_POISON:
        return FlashTimeoutError(
            f"flashcomm: rank {me}: rank {peer} gave up on a call after {timeout_s:g} s waiting for rank {late}: "
            f"rank {late} was late, gone, or called all_reduce with a different size or mode.{tail}", late=late)
    return FlashTimeoutError(
        f"flashcomm: rank {me} timed out after {timeout_s:g} s waiting for rank {peer} (block {rec['block']}, "
        f"round {rec['epoch']}): rank {peer} did not call all_reduce in time, or called it with a different size "
        f"or mode.{tail}", late=peer)


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` for the block.  NCCL reads its settings when the first
    communicator of the process is created and keeps them, so this decides only for a
    process whose first NCCL communicator is created inside the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


_warned = False


def make_gpu_backend(comm, **options):
    """The flash backend, or NCCL with one warning naming the reason when no transport works."""
    global _warned
    try:
        return FlashGpuBackend(comm, **options)
    except PeerAccessError as exc:
        if resolve_transport(options.get("transport")) != "auto":
            raise  # a transport asked for by name: say why it cannot run rather than run another
        if comm.Get_rank() == 0 and not _warned:
            warnings.warn(f"flashcomm: no transport for the flash kernels works here, falling back to NCCL: {exc}",
                          RuntimeWarning, stacklevel=3)
            _warned = True
        opts = {k: v for k, v in options.items() if k in ("device",)}
        return NcclBackend(comm, **opts)
