"""Several ranks of one flash job on one GPU, in one process: a testing aid, not a transport.

:class:`LoopbackJob` gives each simulated rank its own workspace, error record and stream on the
current GPU; every rank's ``peers`` table points at all of them, as CUDA IPC would.  A call
launches each rank's kernel on its rank's stream, so the kernels run at once and exchange
their data and signals through this GPU's memory (L2), not NVLink.  What it checks on a
machine with one GPU: the kernels' arithmetic for any world size from 2 to 8 against the
NumPy reference, their signalling (flags, LL words, epochs, slot parities) over many calls,
and their failure paths (a rank that never launches, or launches late).  What it cannot
check: ordering and visibility across a real interconnect, host-mapped or IPC memory, speed.

Every rank's blocks must be resident at once (block ``b`` of one rank waits for block ``b``
of the others), so the layout gives each rank ``max_blocks`` = its share of the GPU and
:meth:`LoopbackJob.launch` refuses a plan whose grids would not all fit -- except where a job
is made with ``unfit_ll_grids=True`` (see :class:`LoopbackJob`), which checks the exactness of
launches only a GPU of its own can hold at once.  Nothing here is used by the backends;
``tests/gpu/test_loopback_gpu.py`` and the benchmarks use it.
"""
from __future__ import annotations

import ctypes
from typing import List, Optional, Sequence

from ...config import Mode
from ..ipc import fill_new_workspace
from ...dtypes import dtype_name, resolve_dtype
from . import kernels
from .backend import launch_args, resident_blocks
from .layout import ERROR_FIELDS, MAX_RANKS, WorkspaceLayout
from .plan import Force, Limits, Plan, select_plan
from .table import TuningTable
from .workspace import base_args, new_error_record, write_poison_peers

#: blocks of a 256-thread flag kernel one H100/H200 SM holds at once (the backends' two per SM)
_BLOCKS_PER_SM = 2


class LoopbackJob:
    """``world`` simulated ranks of one flash job on the current GPU.

    ``max_blocks``: workspace blocks per rank (default: this GPU's share, two blocks per SM
    split among the ranks), ``timeout_s``: the kernels' wait bound, ``build``: which kernels
    (:class:`.kernels.KernelBuild`).  Close it (or use it as a context manager) to free the
    workspaces and the host-mapped error records.

    ``unfit_ll_grids``: two ranks whose LL grids need not both be resident, only each fit
    with a block to spare (give the job ``max_blocks`` up to the GPU's whole share).  For
    exactness checks of the launches a rank with a GPU of its own runs (e.g. the 1 MB
    quantized one-shot's 256 blocks of 256 threads), never for timing.  Why such a call still
    completes: in the LL kernels block ``b`` waits only for block ``b`` of the other rank, and
    only for what that block writes before its own waits; blocks of a grid start in index
    order, so the rank with fewer started blocks has every one of its resident blocks'
    partners started, and while neither grid fills the GPU alone that rank always has a
    block resident.  Should the GPU start blocks otherwise, the call times out into the
    error record (``timeout_s``); it does not hang.
    """

    def __init__(self, world: int, *, max_blocks: Optional[int] = None, slot_bytes: int = 48 << 10,
                 timeout_s: float = 2.0, build: kernels.KernelBuild = kernels.SHIPPED, unfit_ll_grids: bool = False):
        if not 2 <= world <= MAX_RANKS:
            raise ValueError(f"world must be 2 to {MAX_RANKS}, got {world}")
        if unfit_ll_grids and world != 2:
            raise ValueError(f"unfit_ll_grids needs 2 ranks (with more, their grids can fill the GPU "
                             f"with blocks that all wait), got {world}")
        self.unfit_ll_grids = unfit_ll_grids
        import cupy
        rt = cupy.cuda.runtime
        self.world, self.build, self.timeout_s = world, build, float(timeout_s)
        self.sm_count = rt.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
        share = self.sm_count * _BLOCKS_PER_SM // world
        self.layout = WorkspaceLayout(world, int(max_blocks or share), slot_bytes)
        self.limits = Limits.of_layout(self.layout, sm_count=self.sm_count // world,
                                       blocks_per_sm=lambda kernel, key, threads, smem: resident_blocks(
                                           kernels.kernel(kernel, key, build), threads, smem))
        self.ws: List = []
        self.err_ptrs: List[int] = []
        self.streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(world)]
        try:
            for _ in range(world):
                self.ws.append(cupy.empty(self.layout.total, dtype=cupy.uint8))
                fill_new_workspace(self.ws[-1].data.ptr, self.layout, self.layout.total)
                self.err_ptrs.append(new_error_record())
            bases = [w.data.ptr for w in self.ws]
            for w in self.ws:
                write_poison_peers(w.data.ptr, self.layout, bases)
            cupy.cuda.Device().synchronize()
        except BaseException:
            self.close()
            raise
        self.base = [base_args(self.layout, bases, self.err_ptrs[r], r, self.timeout_s) for r in range(world)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def plan(self, n: int, dtype, mode: Mode, force: Optional[Force] = None, protocol: str = "auto") -> Plan:
        """What every rank runs for a call of ``n`` elements (the heuristic's choice, or ``force``)."""
        return select_plan(n, dtype_name(resolve_dtype(dtype)), mode, world=self.world,
                           table=TuningTable({}, "none"), limits=self.limits, force=Force.of(force),
                           protocol=protocol)

    def launch(self, inputs: Sequence, outs: Sequence, mode: Mode, plan: Plan, ranks=None,
               after_current: bool = True) -> None:
        """Launch ``plan`` for each rank in ``ranks`` (default: all) from ``inputs[r]`` into
        ``outs[r]`` (16-byte aligned CuPy arrays) on the rank's stream; returns at once.
        ``after_current``: first make every rank's stream wait for the work queued so far on
        CuPy's current stream (where the arrays were made)."""
        import cupy
        if plan.uses_nccl:
            raise ValueError("the loopback job runs flash kernels only; this call's plan is NCCL")
        fn = kernels.kernel(plan.kernel, plan.build, self.build)
        fit = resident_blocks(fn, plan.threads, plan.smem) * self.sm_count
        unfit_allowed = self.unfit_ll_grids and plan.protocol == "ll" and plan.blocks < fit
        if plan.blocks * self.world > fit and not unfit_allowed:
            raise ValueError(f"{self.world} grids of {plan.blocks} blocks of {plan.kernel} do not fit this GPU "
                             f"at once ({fit} blocks); give the job fewer blocks")
        if after_current:
            ready = cupy.cuda.Event(disable_timing=True)
            ready.record(cupy.cuda.get_current_stream())
        for r in range(self.world) if ranks is None else ranks:
            if after_current:
                self.streams[r].wait_event(ready)
            args = launch_args(self.base[r], plan, int(inputs[r].size), mode)
            args[0]["in_ptr"], args[0]["out_ptr"] = inputs[r].data.ptr, outs[r].data.ptr
            fn((plan.blocks,), (plan.threads,), (args,), stream=self.streams[r], shared_mem=plan.smem)

    def all_reduce(self, inputs: Sequence, mode: Mode, dtype=None, force: Optional[Force] = None,
                   protocol: str = "auto", ranks=None, fill=None) -> List:
        """Every rank's result of one call (CuPy arrays; ranks not in ``ranks`` are not
        launched and get ``fill``-filled outputs), after the GPU finished.  ``dtype``: the
        element type, needed for bfloat16 (its CuPy arrays are uint16; default: the arrays')."""
        import cupy
        dtype = dtype or inputs[0].dtype
        plan = self.plan(int(inputs[0].size), dtype, mode, force, protocol)
        outs = [cupy.empty_like(x) if fill is None else cupy.full_like(x, fill) for x in inputs]
        self.launch(inputs, outs, mode, plan, ranks)
        self.synchronize()
        return outs

    def capture(self, calls: Sequence, repeat: int = 1):
        """A CUDA graph of ``calls`` -- (inputs, outs, mode, plan) each, as :meth:`launch` takes
        them -- ``repeat`` times over, back to back on every rank's stream (the ranks' chains are
        joined only at the start and the end).  Replay it with ``graph.launch(job.streams[0])``."""
        import cupy
        origin = self.streams[0]
        origin.begin_capture()
        start = cupy.cuda.Event(disable_timing=True)
        start.record(origin)
        for s in self.streams[1:]:
            s.wait_event(start)
        for _ in range(repeat):
            for inputs, outs, mode, plan in calls:
                self.launch(inputs, outs, mode, plan, after_current=False)
        for s in self.streams[1:]:
            done = cupy.cuda.Event(disable_timing=True)
            done.record(s)
            origin.wait_event(done)
        return origin.end_capture()

    def synchronize(self) -> None:
        for s in self.streams:
            s.synchronize()

    def failure(self, rank: int) -> Optional[dict]:
        """Rank ``rank``'s error record (``ERROR_FIELDS`` -> values), or None while it is empty."""
        rec = (ctypes.c_uint32 * len(ERROR_FIELDS)).from_address(self.err_ptrs[rank])
        return dict(zip(ERROR_FIELDS, rec)) if rec[0] else None

    def close(self) -> None:
        import cupy
        if self.ws:
            cupy.cuda.Device().synchronize()
        self.ws = []
        for p in self.err_ptrs:
            cupy.cuda.runtime.freeHost(p)
        self.err_ptrs = []
