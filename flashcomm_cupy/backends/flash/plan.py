"""Kernel selection for the flash backend: one pure function, :func:`select_plan`.

Given a call (elements, dtype, mode), the world size, the tuning table and the facts of this
GPU and workspace (:class:`Limits`), it returns the :class:`Plan` that runs: the algorithm, the
signalling protocol, the kernel and its build, and the launch shape.  Every decision of that
kind is made here once: what ``algo="auto"`` means on the flash backend, which tuning class a
mode falls in (via :func:`flashcomm_cupy.codecs.tuning_class`), whether the LL kernels can serve
a call, whether the staged two-shot applies, and every tile, segment and block count.  Nothing
here touches a GPU: the one hardware question (how many blocks of a kernel fit an SM) is the
``blocks_per_sm`` callable of :class:`Limits`, faked in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from ... import codecs
from ...config import Mode
from ...dtypes import KERNEL_DTYPE_CODE, dtype_name, resolve_dtype
from .table import Choice, TuningTable, heuristic, heuristic_candidates

#: elements per thread and unit of the flag kernels and the lossless LL kernels (FC_ELEMS default)
ELEMS_PER_THREAD = 32
#: The quantized LL kernels run 16-element units wherever the group allows (g <= 32 x 16):
#: half as long a chain per lane, twice the lanes (benchmarks/NOTES.md v18).
LLQ_UNIT_ELEMS = 16
#: ... and the quantized LL one-shot of small messages 8-element units (g <= 32 x 8) where each lane
#: then holds one unit: in a call of about a warp a scheduler each lane's path is the call's
#: latency, and halving it again took 0.5-1.0 us off INT6/INT8 calls of 4-512 KB, rotated or not; at 1 MB,
#: where the blocks a rank may run made it two units a lane, it cost 0.5-1.0 (benchmarks/NOTES.md v37).
LLQ_SMALL_UNIT_ELEMS = 8
#: the largest call (elements) that may run the 8-element one-shot: 2^19 (1 MB of float16, 2 MB of
#: float32), whose one unit a lane takes 256 blocks of 256 threads, which a GPU of its own holds at once
#: (two an SM; a smaller GPU's plan keeps 16-element units).  There the float16 kernel's own work is
#: 0.2-0.4 us shorter for INT6/INT8, rotated or not (kernel_solo, NOTES v38; float32 not timed), and
#: every dtype's results are exact (the loopback's unfit_ll_grids, NOTES v39); its bytes on the link
#: are the 16-element form's.
LLQ_SMALL_UNIT_MAX_ELEMS = 1 << 19
#: ... for a codec whose 8-element LL form takes more bytes an element than its 16-element one
#: (INT4: 2 against 1; INT6/INT8: 2 either way).  The loopback's gain (0.3-0.5 us at 64-256 KB, none
#: at 512 KB unrotated) cannot see the link; over NVLink the LL one-shot moves about 330 KB a us
#: (2xH200, lossless, 64 KB -> 1 MB: 4.0 -> 7.0 us), so the extra byte an element costs about
#: 0.4 us at 2^17 elements, 0.8 at 2^18 and 1.6 at 2^19: taken up to 2^17 (benchmarks/NOTES.md v38).
LLQ_SMALL_UNIT_MAX_ELEMS_MORE_BYTES = 1 << 17
#: threads per block of the quantized LL kernels by unit size (FC_LLQ_THREADS in fc_allreduce.cu)
LLQ_MAX_THREADS = {8: 256, 16: 256, 32: 128}
#: From this many warps in the grid, by the one-shot's codec (its reduce-scatter bits), a rotating
#: quantized LL one-shot runs fc_llq_oneshot_rot, whose forward and inverse rotations share one
#: out-of-line copy of the butterflies (FcRotCode, fc_quant.cuh); below it, fc_llq_oneshot with the
#: butterflies inline.  On one H200's loopback (benchmarks/NOTES.md v32, v36), at the 2xH200 table's
#: shapes and at 128-thread blocks: from 16 warps the shared copy saves INT6/INT8 0.2-0.65 us
#: (INT8 g1024 1.7-2.5), from 64 warps every codec 0.6-1.6 us; below 16 warps its call costs up to
#: 0.25 us more, and INT4 at 16 warps 0.16-0.18.  Those are 16- and 32-element units; with 8-element
#: ones (half the code on a lane's path) the shared copy loses 0.07-0.14 us up to 32 warps and saves
#: 0.3-0.6 from 64, every codec alike (NOTES v37): SHARED_ROTATION_MIN_WARPS_SMALL_UNITS.
SHARED_ROTATION_MIN_WARPS = {4: 32, 6: 16, 8: 16}
SHARED_ROTATION_MIN_WARPS_SMALL_UNITS = 64


def shares_rotation_code(mode: Mode, blocks: int, threads: int, elems: int = LLQ_UNIT_ELEMS) -> bool:
    """True where a quantized LL one-shot of ``blocks`` blocks of ``threads`` in ``mode`` with
    ``elems``-element units runs fc_llq_oneshot_rot."""
    least = (SHARED_ROTATION_MIN_WARPS_SMALL_UNITS if elems == LLQ_SMALL_UNIT_ELEMS
             else SHARED_ROTATION_MIN_WARPS[mode.rs_bits])
    return mode.rotate and blocks * threads // 32 >= least


#: registers of one SM (sm_70 to sm_90): every launched LL block must be resident, two per SM
SM_REGISTERS = 65536
#: fc_warp_gather's per-warp stage, in 16-byte vectors (FC_STAGE_VECS in fc_common.cuh)
STAGE_VECS = 144
#: bytes a slot keeps free past a tile's wire chunk (the flag kernels' chunk headers)
SLOT_RESERVE = 256
#: smallest slot the workspace allocates: a 128-thread tile of 16-bit elements plus the reserve
MIN_SLOT_BYTES = 2 * ELEMS_PER_THREAD * 128 + SLOT_RESERVE
#: the algorithms whose launch shape a :class:`Force` may set
FORCEABLE_ALGOS = ("oneshot", "twoshot")
#: the backend's protocol settings: the table's choice, or the flag / LL protocol wherever it serves
PROTOCOL_SETTINGS = ("auto", "flag", "ll")
#: the flag two-shot's halves (kernels_cu/fc_flag.cuh) by phase: the hierarchical all-reduce's node-local steps
PHASE_KERNELS = {"reduce_scatter": "fc_reduce_scatter", "all_gather": "fc_all_gather"}


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


def llq_small_unit_max_elems(rs_bits: int) -> int:
    """The largest one-shot (elements) in codec ``rs_bits`` that may run 8-element units."""
    spec = codecs.spec(rs_bits)
    more_bytes = 2 * spec.ll_unit_bytes(LLQ_SMALL_UNIT_ELEMS) > spec.ll_unit_bytes(LLQ_UNIT_ELEMS)
    return min(LLQ_SMALL_UNIT_MAX_ELEMS, LLQ_SMALL_UNIT_MAX_ELEMS_MORE_BYTES) if more_bytes else LLQ_SMALL_UNIT_MAX_ELEMS


def llq_unit_elems(group_size: int, algo: str = "twoshot", n: int = 0, *, rs_bits: Optional[int] = None) -> int:
    """Unit size of a quantized LL kernel for ``n`` elements in groups of ``group_size`` (a group
    spans at most a warp): the 8-element units that a small one-shot in codec ``rs_bits`` (needed
    for a one-shot) tries first (its plan keeps them where each lane then holds one unit; the
    8-element builds hold the one-shot alone), else the smallest the group allows from 16."""
    if algo == "oneshot":
        if rs_bits is None:
            raise ValueError("llq_unit_elems: a one-shot's unit size depends on its codec (rs_bits)")
        if n <= llq_small_unit_max_elems(rs_bits) and group_size <= 32 * LLQ_SMALL_UNIT_ELEMS:
            return LLQ_SMALL_UNIT_ELEMS
    return LLQ_UNIT_ELEMS if group_size <= 32 * LLQ_UNIT_ELEMS else ELEMS_PER_THREAD


def _padded(chunks: int) -> int:
    return chunks + chunks // 8  # one pad vector every eight (fc_stage_index)


def staged_twoshot_smem(itemsize: int, rs_bits: int, ag_bits: int, world: int, threads: int,
                        elems: int = ELEMS_PER_THREAD) -> int:
    """Dynamic shared memory (bytes) of the staged flag two-shot: per warp, the stage and
    two buffers of my input's unit plus one unit per other rank (FcStagedTwoshot in fc_allreduce.cu)."""
    own = _padded(32 * elems * itemsize // 16)
    src = max(codecs.spec(rs_bits).staged_chunks(elems), codecs.spec(ag_bits).staged_chunks(elems))
    return threads // 32 * (STAGE_VECS + 2 * (own + (world - 1) * src)) * 16


@dataclass(frozen=True)
class KernelKey:
    """Which compiled module a kernel comes from (``-DFC_DT``, ``-DFC_RS_BITS``, ``-DFC_AG_BITS``,
    ``-DFC_ELEMS``); 0 bits = lossless."""

    dtype_code: int
    rs_bits: int
    ag_bits: int
    unit_elems: int = ELEMS_PER_THREAD


@dataclass(frozen=True)
class Limits:
    """What one rank's GPU and workspace allow; the same on every rank (the backend checks).

    ``blocks_per_sm(kernel, build, threads, smem)`` is the occupancy probe (blocks of that kernel
    resident on one SM with ``smem`` dynamic shared bytes; 0: none fit), asked only about the
    staged two-shot.  ``uniform_gpus``: every rank has the same kind of GPU, so an occupancy
    answer sizes the same grid everywhere (the staged two-shot needs it).  ``card`` picks the
    tuning table's section.
    """

    max_blocks: int
    max_threads: int = 512
    slot_bytes: int = 48 << 10
    ll_slot_bytes: int = 8 << 10
    sm_count: int = 132
    uniform_gpus: bool = True
    transport: str = "ipc"
    card: Optional[str] = None
    blocks_per_sm: Optional[Callable[[str, KernelKey, int, int], int]] = None

    @classmethod
    def of_layout(cls, layout, **facts) -> "Limits":
        """Limits of a :class:`~flashcomm_cupy.backends.flash.layout.WorkspaceLayout` plus the GPU ``facts``."""
        return cls(max_blocks=layout.max_blocks, slot_bytes=layout.slot_bytes,
                   ll_slot_bytes=layout.ll_slot_bytes, **facts)


@dataclass(frozen=True)
class Force:
    """A launch forced on every flash call whose mode names its algorithm ("oneshot" or
    "twoshot"), in place of the table's: for tuning sweeps and checks that must reach one kernel.
    Where its protocol cannot serve a call, the flag kernels run at its shape."""

    threads: int
    blocks: int
    units: int
    protocol: str = "flag"
    staged: bool = False

    def choice(self, algo: str) -> Choice:
        return Choice(algo, self.threads, self.blocks, self.units, self.protocol, self.staged)

    @classmethod
    def of(cls, value) -> Optional["Force"]:
        """A Force from a Force, a table entry / Choice (its shape), or an old positional
        ``(threads, blocks, units[, protocol[, staged]])`` tuple; None stays None."""
        if value is None or isinstance(value, Force):
            return value
        if isinstance(value, Choice):
            return cls(value.threads, value.blocks, value.units, value.protocol, value.staged)
        if isinstance(value, dict):
            return cls(int(value["threads"]), int(value["blocks"]), int(value["units"]),
                       str(value.get("protocol", "flag")), bool(value.get("staged", False)))
        return cls(*value)


@dataclass(frozen=True)
class Plan:
    """What one call runs.  ``algo`` "nccl" (``protocol`` "", no kernel) means the NCCL baseline.

    ``protocol``: "ll" (data as its own signal), "flag", or "staged" (the flag two-shot staging
    its reads in shared memory).  ``seg_elems``: elements of one owner's segment (the whole
    message for one-shot).  ``units``: units per thread per tile (flag and quantized LL kernels;
    0 for the lossless LL ones), ``ll_tile``: 16-byte vectors per block tile (lossless LL only).
    ``smem``: dynamic shared memory bytes.  ``choice``: the table entry (or forced launch) it
    came from.
    """

    algo: str
    protocol: str = ""
    kernel: str = ""
    build: Optional[KernelKey] = None
    threads: int = 0
    blocks: int = 0
    units: int = 0
    seg_elems: int = 0
    ll_tile: int = 0
    smem: int = 0
    choice: Optional[Choice] = None

    @property
    def uses_nccl(self) -> bool:
        return self.algo == "nccl"


NCCL_PLAN = Plan("nccl")


def select_plan(n: int, dtype, mode: Mode, *, world: int, table: TuningTable, limits: Limits,
                force: Optional[Force] = None, protocol: str = "auto") -> Plan:
    """The plan for an all-reduce of ``n`` elements of ``dtype`` in ``mode`` on ``world`` ranks.

    ``protocol`` is the backend's setting: "auto" follows the table, "flag" takes each row's best
    flag-protocol candidate, "ll" runs the LL kernels wherever they can serve the call.
    ``force`` replaces the table's launch for modes that name "oneshot" or "twoshot".

    The table's first candidate runs (a mode naming an algorithm takes it where it is of that
    algorithm, else that algorithm with the heuristic's thread count), except where it asks for
    LL and the LL kernels cannot serve the call (the tiles would need more blocks than can be
    resident): then the first flag-protocol candidate runs, chosen the same way.  Where no
    section of the table covers the call, the heuristic's candidates stand in.  Quantized modes never run
    NCCL (a row whose choice is NCCL gets the heuristic).  The staged two-shot runs where its
    choice asks for it, the mode is quantized, the data is 16-bit, the GPUs are uniform and at
    least one block fits an SM; the plain flag two-shot elsewhere.
    """
    dt = resolve_dtype(dtype)
    name, itemsize = dtype_name(dt), dt.itemsize
    if mode.algo == "mpi":
        raise ValueError("algo='mpi' is the CPU backend's baseline; use 'nccl' on GPUs")
    if protocol not in PROTOCOL_SETTINGS:
        raise ValueError(f"protocol must be one of {PROTOCOL_SETTINGS}, got {protocol!r}")
    force = Force.of(force)
    nbytes = n * itemsize
    cls = codecs.tuning_class(mode.rs_bits, mode.ag_bits)

    def table_choice(flag_only: bool) -> Choice:
        if force is not None and mode.algo in FORCEABLE_ALGOS:
            forced = force.choice(mode.algo)
            return replace(forced, protocol="flag") if flag_only else forced
        cands = (table.candidates(world, nbytes, cls, limits.transport, limits.card)
                 or heuristic_candidates(world, nbytes, mode.lossless))
        best = next(c for c in cands if c.protocol == "flag") if flag_only else cands[0]
        if mode.algo == "auto":
            return heuristic(world, nbytes, False) if best.algo == "nccl" and not mode.lossless else best
        if mode.algo == best.algo:
            return best
        rule = heuristic(world, nbytes, mode.lossless)
        return Choice(mode.algo, rule.threads, 0, 1, "flag" if flag_only else rule.protocol)

    def choose(flag_only: bool) -> Choice:
        flag_only = flag_only or protocol == "flag"  # the row's best flag choice, not the LL shape with flags
        choice = table_choice(flag_only)
        if protocol == "ll" and choice.protocol != "ll" and choice.algo != "nccl" and not flag_only:
            choice = replace(choice, protocol="ll")
        return choice

    choice = choose(False)
    if choice.algo == "nccl":
        return NCCL_PLAN
    if choice.protocol == "ll":
        plan = _ll_plan(choice, n, name, itemsize, mode, world, limits)
        if plan is not None:
            return plan
        choice = choose(True)
        if choice.algo == "nccl":
            return NCCL_PLAN
    return _flag_plan(choice, n, name, itemsize, mode, world, limits)


def select_phase_plan(n: int, dtype, mode: Mode, phase: str, *, world: int, table: TuningTable, limits: Limits,
                      force: Optional[Force] = None) -> Plan:
    """The plan of one half (``phase``: "reduce_scatter" or "all_gather") of the flag two-shot
    of ``n`` elements of ``dtype`` in ``mode`` on ``world`` ranks.

    It is the flag two-shot's plan for the same call (segments, tiles, threads, blocks, units)
    with the half's kernel, so both halves of a call cut the message alike and the shard
    between them is ``seg_elems`` float32 elements (the owner's segment, padding included).
    The halves exist in the flag protocol only: never LL, never staged, never NCCL (the table
    is read as with ``protocol="flag"`` and ``algo="twoshot"``).
    """
    if phase not in PHASE_KERNELS:
        raise ValueError(f"phase must be one of {tuple(PHASE_KERNELS)}, got {phase!r}")
    if world < 2:
        raise ValueError(f"a two-shot half needs two or more ranks, got {world}")
    flat = select_plan(n, dtype, mode.with_algo("twoshot"), world=world, table=table,
                       limits=replace(limits, uniform_gpus=False),  # no staged form
                       force=force, protocol="flag")
    assert flat.protocol == "flag" and flat.algo == "twoshot", flat
    return replace(flat, kernel=PHASE_KERNELS[phase])


def _dtype_code(name: str) -> int:
    return KERNEL_DTYPE_CODE[name]


def _flag_plan(choice: Choice, n: int, name: str, itemsize: int, mode: Mode, world: int, limits: Limits) -> Plan:
    """The flag-protocol kernels: segments of whole groups (32-element units when lossless); a
    tile of threads x 32 x units elements must fit one workspace slot, and a 512-thread block
    fills an SM, so only half as many of those are resident."""
    quantum = ELEMS_PER_THREAD if mode.lossless else mode.group_size
    quanta = -(-n // quantum)
    seg = (-(-quanta // world) if choice.algo == "twoshot" else quanta) * quantum
    per_elem = itemsize if mode.lossless else max(mode.rs_codec.wire_bytes_per_element(),
                                                  mode.ag_codec.wire_bytes_per_element())
    room = limits.slot_bytes - SLOT_RESERVE
    threads = min(max(choice.threads, quantum // ELEMS_PER_THREAD, 64), limits.max_threads)
    while threads > 64 and threads * ELEMS_PER_THREAD * per_elem > room:
        threads //= 2  # e.g. lossless fp32 at 512 threads does not fit a 48 KiB slot
    fit = int(room // (threads * ELEMS_PER_THREAD * per_elem))
    units = max(1, min(choice.units, fit, -(-seg // (threads * ELEMS_PER_THREAD))))
    resident = limits.max_blocks // (2 if threads > 256 else 1)
    most = resident if choice.blocks <= 0 else min(choice.blocks, resident)
    blocks = max(1, min(most, -(-seg // (threads * ELEMS_PER_THREAD * units))))
    build = KernelKey(_dtype_code(name), mode.rs_bits or 0, mode.ag_bits or 0)
    plan = Plan(choice.algo, "flag", "fc_twoshot" if choice.algo == "twoshot" else "fc_oneshot", build,
                threads, blocks, units, seg, 0, 0, choice)
    staged = _staged(plan, mode, itemsize, world, limits)
    return staged or plan


def _staged(plan: Plan, mode: Mode, itemsize: int, world: int, limits: Limits) -> Optional[Plan]:
    """``plan`` as the staged flag two-shot, or None where it does not apply (not asked for,
    lossless, float32, ranks on different kinds of GPU, or not even one block fits an SM).

    Its shared memory grows with the world size and the codec, so how many blocks fit an SM
    at once comes from the occupancy probe: every launched block must be resident (block b
    waits for block b of every peer).
    """
    if not (plan.choice.staged and plan.algo == "twoshot" and not mode.lossless and itemsize == 2
            and limits.uniform_gpus):
        return None
    smem = staged_twoshot_smem(itemsize, mode.rs_bits, mode.ag_bits, world, plan.threads)
    per_sm = limits.blocks_per_sm("fc_twoshot_staged", plan.build, plan.threads, smem) \
        if limits.blocks_per_sm is not None else 0
    if per_sm < 1:
        return None
    return replace(plan, protocol="staged", kernel="fc_twoshot_staged", smem=smem,
                   blocks=min(plan.blocks, limits.sm_count * per_sm))


def _ll_plan(choice: Choice, n: int, name: str, itemsize: int, mode: Mode, world: int, limits: Limits) -> Optional[Plan]:
    """The LL kernels' plan, or None where they cannot serve the call.

    Lossless: a segment (the whole message for one-shot, one owner's share for two-shot) is
    whole 16-byte vectors, cut into block tiles of ``ll_tile`` vectors.  Quantized: see
    :func:`_llq_plan`.  Either way every tile fits an LL slot, every block is resident, and
    every launched block gets a non-empty tile, so each block index exchanges data with every
    peer in every call (the LL slot-reuse argument in fc_ll.cuh needs that).
    """
    if not mode.lossless:
        return _llq_plan(choice, n, name, itemsize, mode, world, limits)
    per = codecs.VECTOR_BYTES // itemsize
    share = n if choice.algo == "oneshot" else -(-n // world)
    vecs = -(-share // per)
    threads = min(max(choice.threads, 64), limits.max_threads)
    resident = limits.max_blocks // (2 if threads > 256 else 1)
    slot_vecs = limits.ll_slot_bytes // codecs.VECTOR_BYTES
    fewest = -(-vecs // slot_vecs)
    if fewest > resident:
        return None
    want = choice.blocks if choice.blocks > 0 else -(-vecs // threads)
    blocks = max(fewest, min(want, resident, vecs))
    tile = -(-vecs // blocks)
    kernel = "fc_ll_oneshot" if choice.algo == "oneshot" else "fc_ll_twoshot"
    return Plan(choice.algo, "ll", kernel, KernelKey(_dtype_code(name), 0, 0), threads, -(-vecs // tile), 0,
                vecs * per, tile, 0, choice)


def _llq_plan(choice: Choice, n: int, name: str, itemsize: int, mode: Mode, world: int, limits: Limits) -> Optional[Plan]:
    """The quantized LL kernels' plan, or None.

    One-shot: segment = the whole message (only the reduce-scatter codec is used).  Two-shot:
    segments of whole groups as in the flag two-shot (the reference's SegmentLayout).  INT6/INT8
    units take 1.5-2x the bytes of INT4 in LL form, so the table's ``wide`` class decides where
    they run LL.  Block b handles tile b (threads x E x units elements, E =
    :func:`llq_unit_elems`) of every segment, and only one tile per block and call exists.
    """
    elems = llq_unit_elems(mode.group_size, choice.algo, n, rs_bits=mode.rs_bits)
    plan = _llq_plan_of(elems, choice, n, name, itemsize, mode, world, limits)
    if elems == LLQ_SMALL_UNIT_ELEMS and (plan is None or plan.units > 1):
        plan = _llq_plan_of(llq_unit_elems(mode.group_size), choice, n, name, itemsize, mode, world, limits)
    return plan


def _llq_plan_of(elems: int, choice: Choice, n: int, name: str, itemsize: int, mode: Mode, world: int,
                 limits: Limits) -> Optional[Plan]:
    """:func:`_llq_plan` with units of ``elems`` elements."""
    bits = (mode.rs_bits,) if choice.algo == "oneshot" else (mode.rs_bits, mode.ag_bits)
    wire = max(codecs.spec(b).ll_unit_bytes(elems) for b in bits)
    slot_units = limits.ll_slot_bytes // wire
    threads = min(max(choice.threads, 64), llq_threads(elems, itemsize, choice.algo, mode.rs_bits, mode.ag_bits))
    if threads > slot_units:
        return None
    quantum = mode.group_size
    groups = -(-n // quantum)
    seg = (groups if choice.algo == "oneshot" else -(-groups // world)) * quantum
    seg_units = seg // elems
    most = slot_units // threads
    fewest = -(-seg_units // (threads * limits.max_blocks))  # more blocks than that cannot be resident
    units = max(1, min(max(choice.units, fewest), most, -(-seg_units // threads)))
    blocks = -(-seg_units // (threads * units))
    if blocks > limits.max_blocks:  # two blocks of llq_threads() fit an SM: max_blocks are resident
        return None
    if choice.algo == "twoshot":
        kernel = "fc_llq_twoshot"
    elif shares_rotation_code(mode, blocks, threads, elems):
        kernel = "fc_llq_oneshot_rot"
    else:
        kernel = "fc_llq_oneshot"
    return Plan(choice.algo, "ll", kernel, KernelKey(_dtype_code(name), mode.rs_bits, mode.ag_bits, elems),
                threads, blocks, units, seg, 0, 0, choice)
