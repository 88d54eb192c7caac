"""The flash GPU backend: fused one-shot / two-shot kernels over a shared workspace.

Every rank's workspace is shared by a transport (:mod:`..transport`: CUDA IPC over legacy or
virtual-memory handles, or host memory), verified by real peer stores before first use; NCCL
rides along for ``algo="nccl"`` and as the fallback when no transport works
(:func:`flashcomm_cupy.backends.gpu.make_gpu_backend`).  What runs for a call is
:func:`.plan.select_plan`'s :class:`.plan.Plan`, cached per (size, dtype, mode); this class
prepares its launch once and replays it.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Optional

import numpy as np

from ... import _mpi, settings
from ...config import Mode
from ...dtypes import dtype_name
from ...errors import FlashTimeoutError, resolve_timeout
from ..cuda_util import CudaBackend, run_on_aligned_copies, select_device
from ..nccl import NcclCommunicatorHandle
from ..transport import describe as describe_transport, resolve_transport
from . import kernels, table as tuning
from .layout import ERR_NODE, ERR_POISON, FLAG_ROTATE, FLAG_SYM, LATE_OTHER_NODE
from .plan import (ELEMS_PER_THREAD, LLQ_SMALL_UNIT_ELEMS, LLQ_UNIT_ELEMS, PROTOCOL_SETTINGS, Force, KernelKey,
                   Limits, Plan, select_phase_plan, select_plan)
from .workspace import FlashWorkspace, environment

try:  # cuLaunchKernel with a prebuilt parameter array: the eager path's host cost is the launch
    from cupy_backends.cuda.api.driver import launchKernel as _launch_kernel
except Exception:  # pragma: no cover - older CuPy: launch through RawKernel.__call__
    _launch_kernel = None


def _dtype_of_itemsize(itemsize: int) -> str:
    """The dtype ``resolve_algo``/``resolve_protocol`` plan for (16-bit types plan alike)."""
    return "float32" if itemsize >= 4 else "float16"


def resident_blocks(fn, threads: int, smem: int) -> int:
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


class Launch:
    """A prepared kernel launch of a :class:`.plan.Plan`: the kernel, grid, block and argument
    block (FcArgs bytes).

    ``ptrs`` views the argument block as uint64 (in/out pointers at [0], [1]).  ``func`` (a
    CUfunction, or 0) and ``params`` (a one-entry kernelParams array pointing at the argument
    block) let the eager path call cuLaunchKernel directly instead of marshalling the
    arguments in Python on every call.
    """

    __slots__ = ("plan", "fn", "grid", "block", "args", "ptrs", "func", "params", "params_ptr", "smem")

    def __init__(self, fn, blocks, threads, args, smem=0, plan: Optional[Plan] = None):
        self.plan = plan
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

    def __call__(self, x_ptr: int, out_ptr: int, stream_ptr: int) -> None:
        """Launch on 16-byte aligned device pointers (the hot path of every call).  The driver
        copies the argument block at launch, so reusing it is safe."""
        self.ptrs[0] = x_ptr
        self.ptrs[1] = out_ptr
        if self.func:
            _launch_kernel(self.func, self.grid[0], 1, 1, self.block[0], 1, 1, self.smem, stream_ptr,
                           self.params_ptr, 0)
        else:
            self.fn(self.grid, self.block, (self.args,), stream=_external_stream(stream_ptr), shared_mem=self.smem)


def launch_args(base: np.ndarray, plan: Plan, n: int, mode: Mode) -> np.ndarray:
    """A copy of the base argument block with one call's fields: size, mode and ``plan``'s shape."""
    args = base.copy()
    a = args[0]
    a["n"] = n
    a["group"] = mode.group_size
    a["flags"] = (FLAG_ROTATE if mode.rotate else 0) | (FLAG_SYM if mode.symmetric else 0)
    a["rot_norm"] = np.float32(1.0 / np.sqrt(float(mode.group_size)))
    a["seg_elems"], a["units"], a["ll_tile"] = plan.seg_elems, plan.units, plan.ll_tile
    return args


class FlashGpuBackend(CudaBackend):
    """Flash All-Reduce on the GPUs of one host, one process per GPU.

    Options: ``device`` (GPU ordinal; default local rank), ``timeout_s``
    (bound of every spin-wait; default ``$FLASHCOMM_TIMEOUT_S`` or 30),
    ``validate`` (all-gather sizes and modes before every call and raise on
    mismatch), ``max_blocks`` and ``max_threads`` (workspace shape),
    ``tuning_path`` (path of a dispatch table), ``protocol`` ("auto" follows the
    table; "flag" or "ll" forces that signalling protocol wherever it applies:
    LL serves every mode while the message fits the LL slots, see :mod:`.table`;
    default ``$FLASHCOMM_PROTOCOL`` or "auto"), ``transport`` ("auto", "ipc" or
    "host": where the workspaces live, see :mod:`..transport`; default
    ``$FLASHCOMM_TRANSPORT`` or "auto"), ``kernel_build`` (a :class:`.kernels.KernelBuild`
    for kernel experiments; default the shipped kernels).  With ``transport="host"`` the
    NCCL baseline is created with ``NCCL_P2P_DISABLE=1``, so it runs in the same
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
                 tuning_path=None, slot_bytes=48 << 10, protocol=None, transport=None,
                 kernel_build: Optional[kernels.KernelBuild] = None):
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
        # Local steps (any of them may fail on one rank only: a bad value in one rank's
        # environment, an unreadable tuning file) end in one collective that every rank reaches,
        # so a failure raises on every rank instead of leaving the others in the next collective.
        failure, device_kind = None, None
        try:
            max_blocks, device_kind = self._local_settings(cupy, timeout_s, max_threads, slot_bytes, kernel_build,
                                                           max_blocks, tuning_path, protocol, transport)
        except Exception as exc:
            failure = exc
        _mpi.raise_everywhere(comm, failure, "the flash backend")
        # The staged two-shot sizes its grid by an occupancy query on this GPU, and every
        # rank must launch the same grid: it runs only where all ranks have the same GPU.
        self.uniform_gpus = len(set(comm.allgather(device_kind))) == 1
        _mpi.agree(comm, {"max_blocks": int(max_blocks), "max_threads": self.max_threads,
                          "slot_bytes": self.slot_bytes, "protocol": self.protocol, "transport": self.transport,
                          "kernel build": self.kernel_build, "tuning table": self.table.digest()},
                   "flash backend settings")
        self._forced = None
        self._plans = {}
        self._launches = {}
        self._closed = True  # until every resource below exists
        self.flash_ws = None
        #: the NCCL baseline runs without P2P (through host memory), like the host transport
        self.nccl_p2p_disabled = self.transport == "host"
        with environment("NCCL_P2P_DISABLE", "1") if self.nccl_p2p_disabled else contextlib.nullcontext():
            self.nccl = NcclCommunicatorHandle(comm)
        try:
            self.flash_ws = FlashWorkspace(comm, self.world_size, max_blocks, self.slot_bytes, self.device_id,
                                           self.transport, self.timeout_s)
        except BaseException:  # IPC refused, out of memory, a peer's failure: leave nothing behind
            self._release()
            raise
        # The table's section is picked by card: ranks on different kinds of GPU (which could pick
        # different sections, hence different kernels) all take the first section listed.
        self.limits = Limits.of_layout(self.ws.layout, max_threads=self.max_threads, sm_count=self.sm_count,
                                       uniform_gpus=self.uniform_gpus, transport=self.ws.transport,
                                       card=self.card if self.uniform_gpus else None,
                                       blocks_per_sm=self._blocks_per_sm)
        self._closed = False

    @property
    def ws(self):
        """The transport's workspace (``layout``, ``transport``, ``peer_ptrs``, ``ptr``)."""
        return self.flash_ws.ws if self.flash_ws is not None else None

    def _blocks_per_sm(self, kernel: str, build: KernelKey, threads: int, smem: int) -> int:
        return resident_blocks(kernels.kernel(kernel, build, self.kernel_build), threads, smem)

    def precompile(self, dtypes=("float16", "bfloat16", "float32"),
                   bits=((None, None), (4, 4), (6, 6), (8, 8), (4, 8))):
        """Compile kernel specialisations, spread over the ranks (collective).

        CuPy caches binaries on disk, so each rank compiles 1/world of them
        and then loads the rest from the cache.
        """
        from ...dtypes import KERNEL_DTYPE_CODE
        jobs = [(KERNEL_DTYPE_CODE[d], rs or 0, ag or 0, ELEMS_PER_THREAD) for d in dtypes for rs, ag in bits]
        quantized = [(dt, rs, ag) for dt, rs, ag, _ in jobs if rs]
        jobs += [(dt, rs, ag, LLQ_UNIT_ELEMS) for dt, rs, ag in quantized]  # the quantized LL kernels
        jobs += [(dt, rs, ag, LLQ_SMALL_UNIT_ELEMS) for dt, rs, ag in quantized]  # their small one-shot
        for i, job in enumerate(jobs):
            if i % self.world_size == self.rank:  # every build holds the one-shot; the 8-element one only that
                kernels.module(*job, build=self.kernel_build).get_function(
                    "fc_llq_oneshot" if job[3] == LLQ_SMALL_UNIT_ELEMS else "fc_oneshot")
        self.mpi_comm.Barrier()

    # ------------------------------------------------------------------ plans
    def supported_algos(self):
        return ("oneshot", "twoshot", "nccl")

    def _local_settings(self, cupy, timeout_s, max_threads, slot_bytes, kernel_build, max_blocks, tuning_path,
                        protocol, transport) -> tuple:
        """This rank's settings, device facts and tuning table (no collective); the block count
        and what kind of GPU this is (ranks compare it: the staged two-shot needs one kind)."""
        self.timeout_s = resolve_timeout(timeout_s)
        self.max_threads = int(max_threads)
        self.slot_bytes = int(slot_bytes)
        if self.slot_bytes % 16:
            raise ValueError(f"slot_bytes must be a multiple of 16 (16-byte vector accesses), got {slot_bytes}")
        self.kernel_build = kernel_build or kernels.SHIPPED
        props = cupy.cuda.runtime.getDeviceProperties(self.device_id)
        self.sm_count = int(props["multiProcessorCount"])
        card = props.get("name", b"")
        self.card = card.decode(errors="replace") if isinstance(card, bytes) else str(card)
        if max_blocks is None:
            # Two co-resident 256-thread blocks per SM (<= 128 registers each): while one
            # waits for its peers the other computes.  All blocks must be resident at
            # once, since block b waits for block b of every peer.
            max_blocks = 2 * self.sm_count
        device_kind = tuple(props.get(k) for k in ("name", "major", "minor", "multiProcessorCount",
                                                    "sharedMemPerMultiprocessor", "regsPerMultiprocessor"))
        self.table = tuning.load(tuning_path)
        #: "auto" (the table's choice), or "flag" / "ll" forced where they apply
        self.protocol = settings.resolve(settings.PROTOCOL, protocol, "protocol")
        #: "auto", "ipc" or "host" as asked; ``self.ws.transport`` says which one runs
        self.transport = resolve_transport(transport)
        return max_blocks, device_kind

    @property
    def force_launch(self) -> Optional[Force]:
        """Deprecated: a :class:`.plan.Force` applied to every later call (pass ``force=`` to
        :meth:`all_reduce` / :meth:`plan` instead).  Set from an old ``(threads, blocks,
        units[, protocol[, staged]])`` tuple or a Force; None undoes it."""
        return self._forced

    @force_launch.setter
    def force_launch(self, value) -> None:
        self._forced = Force.of(value)

    def plan(self, n: int, dtype, mode: Mode, force: Optional[Force] = None, phase: Optional[str] = None) -> Plan:
        """What a call of ``n`` elements of ``dtype`` in ``mode`` runs (cached; compiles nothing
        but, for the staged two-shot, the kernel the occupancy probe asks about); ``phase``
        ("reduce_scatter" or "all_gather"): that half of the flag two-shot (:func:`.plan.select_phase_plan`)."""
        name = dtype if isinstance(dtype, str) else dtype_name(np.dtype(dtype))
        force = Force.of(force) if force is not None else self._forced
        key = (n, name, mode, force, self.protocol, phase)
        plan = self._plans.get(key)
        if plan is None:
            if phase is None:
                plan = select_plan(n, name, mode, world=self.world_size, table=self.table, limits=self.limits,
                                   force=force, protocol=self.protocol)
            else:
                plan = select_phase_plan(n, name, mode, phase, world=self.world_size, table=self.table,
                                         limits=self.limits, force=force)
            if len(self._plans) >= 1024:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def resolve_algo(self, nbytes: int, mode: Mode, itemsize: int = 2, force: Optional[Force] = None) -> str:
        return self.plan(max(1, nbytes // itemsize), _dtype_of_itemsize(itemsize), mode, force).algo

    def resolve_protocol(self, nbytes: int, mode: Mode, itemsize: int = 2, force: Optional[Force] = None) -> str:
        """"ll", "flag" or "staged" (the flag two-shot staging its reads) for the flash
        kernels that would run; "" when NCCL runs."""
        return self.plan(max(1, nbytes // itemsize), _dtype_of_itemsize(itemsize), mode, force).protocol

    def prepared(self, n: int, name: str, mode: Mode, force: Optional[Force] = None, phase: Optional[str] = None):
        """The cached :class:`Launch` of (n, dtype name, mode[, phase]) (the NCCL :class:`.plan.Plan`
        when NCCL runs).  Eager calls are bound by host time (the kernel of a small message takes a
        few microseconds), so everything but the two array pointers is worked out once."""
        force = Force.of(force) if force is not None else self._forced
        key = (n, name, mode, force, self.protocol, phase)
        launch = self._launches.get(key)
        if launch is not None:
            return launch
        plan = self.plan(n, name, mode, force, phase)
        if plan.uses_nccl:
            launch = plan
        else:
            fn = kernels.kernel(plan.kernel, plan.build, self.kernel_build)
            launch = Launch(fn, plan.blocks, plan.threads, launch_args(self.flash_ws.args, plan, n, mode),
                            plan.smem, plan)
        if len(self._launches) >= 1024:
            self._launches.clear()
        self._launches[key] = launch
        return launch

    # ------------------------------------------------------------------ calls
    def all_reduce(self, x, out, mode: Mode, stream=None, dtype=None, force: Optional[Force] = None):
        """``out`` = the sum of every rank's ``x`` in ``mode``; ``force`` (a :class:`.plan.Force`)
        replaces the table's launch for modes naming "oneshot" or "twoshot" (tuning, checks)."""
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
        launch = self.prepared(n, name, mode, force)
        if not isinstance(launch, Launch):  # "auto" (or the caller) picked NCCL
            self.nccl.all_reduce(x.data.ptr, out.data.ptr, n, name, stream.ptr)
            return out
        return self.run_launch(launch, x, out, stream)

    def run_launch(self, launch: Launch, x, out, stream):
        """Run ``launch`` from ``x`` into ``out`` (CuPy arrays) on ``stream``; returns ``out``."""
        if x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0:
            launch(x.data.ptr, out.data.ptr, stream.ptr)
            return out
        return run_on_aligned_copies(x, out, stream, lambda src, dst: launch(src.data.ptr, dst.data.ptr, stream.ptr))

    # ------------------------------------------------------------------ the two-shot's halves
    def shard_elems(self, n: int, dtype, mode: Mode) -> int:
        """float32 elements of this rank's shard between :meth:`reduce_scatter` and
        :meth:`all_gather` of ``n`` elements of ``dtype`` in ``mode`` (its segment, padded)."""
        return self.plan(n, dtype, mode, phase="reduce_scatter").seg_elems

    def phase_launch(self, n: int, dtype, mode: Mode, phase: str) -> Launch:
        """The prepared :class:`Launch` of one half of the flag two-shot (``phase``:
        "reduce_scatter" or "all_gather"), for callers that replay it (the hierarchical backend)."""
        name = dtype if isinstance(dtype, str) else dtype_name(np.dtype(dtype))
        return self.prepared(n, name, mode, phase=phase)

    def reduce_scatter(self, x, shard, mode: Mode, stream=None, dtype=None):
        """The flag two-shot's first half: ``shard`` (float32, :meth:`shard_elems` elements) =
        this rank's segment of the sum -- :func:`flashcomm_cupy.reference.reduce_owner_segment`
        of the ranks' prepared inputs (own part exact, the others through the reduce-scatter
        codec, rank order, float32), rotated when the mode rotates.  Collective; on failure the
        shard is NaN and the error is raised as for :meth:`all_reduce`."""
        return self._phase("reduce_scatter", x, shard, x, mode, stream, dtype)

    def all_gather(self, shard, out, mode: Mode, stream=None, dtype=None):
        """The flag two-shot's second half: ``out`` (the message's dtype and size) = every rank's
        shard through :func:`flashcomm_cupy.reference.gather_segment` (the owner keeps what it
        sent), rotated back and rounded; ``shard`` as :meth:`reduce_scatter` leaves it."""
        return self._phase("all_gather", shard, out, out, mode, stream, dtype)

    def _phase(self, phase: str, src, dst, message, mode: Mode, stream, dtype):
        import cupy
        self._raise_if_failed()
        dt = np.dtype(dtype) if dtype is not None else np.dtype(message.dtype)
        n = int(message.size)
        shard = dst if phase == "reduce_scatter" else src
        stream = stream or cupy.cuda.get_current_stream()
        if self.validate:
            _mpi.agree(self.mpi_comm, dict(_mpi.call_description(n, dtype_name(dt), mode), phase=phase),
                       f"{phase} arguments")
        if n == 0:
            return dst
        want = self.shard_elems(n, dt, mode)
        if shard.dtype != np.float32 or shard.size != want or not shard.flags.c_contiguous:
            raise ValueError(f"flashcomm: the shard of {n} elements in {mode.label} is a contiguous float32 array of "
                             f"{want} elements, got {shard.dtype} x {shard.size}")
        return self.run_launch(self.phase_launch(n, dt, mode, phase), src, dst, stream)

    def eager_launcher(self, n: int, name: str, mode: Mode):
        """``launch(x_ptr, out_ptr, stream_ptr)`` running what ``all_reduce`` runs for ``n``
        elements of ``name`` in ``mode`` on 16-byte aligned pointers, for the communicator's
        eager cache (:mod:`flashcomm_cupy._eager`); None where every call must go through
        ``all_reduce`` (``validate``, a forced launch, a kernel without a driver handle, empty arrays).

        The launch checks the error record first, as ``all_reduce`` does, and returns False
        without launching once a setting that picks the plan (``protocol``, a forced launch)
        changed since: the caller then takes ``all_reduce``.
        """
        if self.validate or self._forced is not None or n == 0:
            return None
        launch = self.prepared(n, name, mode)
        if isinstance(launch, Launch) and not launch.func:
            return None
        # locals, not attribute chains, on the hot path (self._closed is read first: err is
        # never read once the record is freed)
        err, check, protocol = self.flash_ws.error, self._raise_if_failed, self.protocol

        def unusable():
            if self._closed or err[0]:
                check()
            return self._forced is not None or self.protocol != protocol
        if not isinstance(launch, Launch):
            # Through the handle, not its raw communicator: it refuses calls after an NCCL abort and
            # remembers the stream, so synchronize(), wait() and close() bound the wait for this call.
            nccl_all_reduce, count = self.nccl.all_reduce, n

            def launch_nccl(x_ptr, out_ptr, stream_ptr):
                if self._closed or err[0] or self._forced is not None or self.protocol != protocol:
                    if unusable():
                        return False
                nccl_all_reduce(x_ptr, out_ptr, count, name, stream_ptr)
                return True
            return launch_nccl
        ptrs = (ctypes.c_uint64 * 2).from_address(launch.args.ctypes.data)
        func, gx, bx, smem, params = launch.func, launch.grid[0], launch.block[0], launch.smem, launch.params_ptr

        def launch_kernel(x_ptr, out_ptr, stream_ptr):
            if self._closed or err[0] or self._forced is not None or self.protocol != protocol:
                if unusable():
                    return False
            ptrs[0] = x_ptr
            ptrs[1] = out_ptr
            _launch_kernel(func, gx, 1, 1, bx, 1, 1, smem, stream_ptr, params, 0)
            return True
        launch_kernel.plan = launch  # the closure owns the argument block ``ptrs`` points into
        return launch_kernel

    def _validate(self, n, name, mode):
        _mpi.agree(self.mpi_comm, _mpi.call_description(n, name, mode), "all_reduce arguments")

    # ------------------------------------------------------------------ failures and teardown
    def _raise_if_failed(self):
        if self._closed:
            raise RuntimeError("this flashcomm GPU backend is closed")
        if self.flash_ws.error[0]:  # the kernels wrote the record: a wait failed
            raise error_from_record(self.flash_ws.failure(), self.timeout_s)

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
            if self.nccl is not None:  # NCCL-routed calls first, bounded: past the bound NCCL is aborted
                self.nccl.wait_streams(None, self.timeout_s)
        except Exception:
            pass
        try:
            cupy.cuda.Device(self.device_id).synchronize()
        except Exception:
            pass
        if self.flash_ws is not None:
            self.flash_ws.close()
        if self.nccl is not None:
            self.nccl.close()

    def describe(self):
        info = super().describe()
        peers = self.mpi_comm.allgather(self.ws.peer_ptrs and [True] * self.world_size)
        section = self.table.section(self.world_size, self.ws.transport, self.limits.card)
        info.update(workspace_bytes=self.ws.layout.total, max_blocks=self.ws.layout.max_blocks,
                    timeout_s=self.timeout_s,
                    tuning_table=dict(self.table.describe(), rows_in_use=dict(zip(("card", "world", "transport"),
                                                                                  section)) if section else
                                      "built-in heuristics"),
                    peer_access=peers, transport=describe_transport(self.ws),
                    nccl_p2p_disabled=self.nccl_p2p_disabled)
        if not self.kernel_build.is_shipped:
            info["kernel_build"] = repr(self.kernel_build)
        return info


def error_from_record(rec: dict, timeout_s: float) -> FlashTimeoutError:
    """The exception for a non-empty error record (``layout.ERROR_FIELDS`` -> values)."""
    me, peer, late = rec["rank"], rec["peer"], rec["late"]
    tail = (" Every rank of this communicator raises this error (its workspace is poisoned) and every later call"
            " writes NaN; close it and create a new one.")
    if rec["code"] == ERR_NODE:
        return FlashTimeoutError(
            f"flashcomm: rank {me} (of its node): the hierarchical all-reduce's inter-node step failed on this "
            f"rank (another node failed, or its data never arrived), and it poisoned its node.{tail}", late=None)
    if rec["code"] == ERR_POISON and late == LATE_OTHER_NODE:
        return FlashTimeoutError(
            f"flashcomm: rank {me} (of its node): rank {peer} of this node gave up on a call: a failure on another "
            f"node reached it through the hierarchical all-reduce's inter-node step.{tail}", late=None)
    if rec["code"] == ERR_POISON:
        return FlashTimeoutError(
            f"flashcomm: rank {me}: rank {peer} gave up on a call after {timeout_s:g} s waiting for rank {late}: "
            f"rank {late} was late, gone, or called all_reduce with a different size or mode.{tail}", late=late)
    return FlashTimeoutError(
        f"flashcomm: rank {me} timed out after {timeout_s:g} s waiting for rank {peer} (block {rec['block']}, "
        f"round {rec['epoch']}): rank {peer} did not call all_reduce in time, or called it with a different size "
        f"or mode.{tail}", late=peer)
