"""The flash kernels with several simulated ranks on one GPU, against the NumPy reference.

    python -m pytest tests/gpu/test_loopback_gpu.py [-k quick]

Each rank of a :class:`~flashcomm_cupy.backends.flash.loopback.LoopbackJob` has its own
workspace and stream on this GPU, so every kernel -- flag one-shot and two-shot, the staged
two-shot, the lossless and the quantized LL kernels -- runs its whole protocol between real
concurrent kernels, with data and signals through this GPU's memory.  Results must equal the
reference bit for bit on every rank, at 2 to 8 ranks; a rank that never launches, or launches
after the others gave up, must leave NaN and an error record on every rank, never a wrong sum.

This checks what the kernels compute and how they signal, on a machine with one GPU; the
multi-GPU checks (``test_flash_gpu.py``, ``test_faults_gpu.py``) remain the proof over NVLink.
"""
import os

import numpy as np
import pytest

from gpu_checks import DTYPE_NAMES, host_input, to_device as device  # the multi-GPU checks' inputs

pytestmark = [pytest.mark.gpu]

NAN16 = 0x7E00


def bits_of(x):
    host = x.get() if hasattr(x, "get") else np.asarray(x)
    return host.view(np.uint32 if host.dtype.itemsize == 4 else np.uint16)


def all_nan(x, dtype):
    from flashcomm_cupy.dtypes import DTYPES
    host = x.get()
    return bool(np.isnan(host.view(DTYPES[dtype]).astype(np.float32)).all())


def assert_reference(job, host, outs, mode, dtype, label):
    """Every rank's output equals the reference bit for bit."""
    from flashcomm_cupy import flash_all_reduce_reference
    want = bits_of(flash_all_reduce_reference(host, mode=mode)[0])
    for r, out in enumerate(outs):
        got = bits_of(out)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"{label}: rank {r} of {job.world}: {bad.size} of {got.size} elements differ, "
                               f"first at {bad[:5]}: got {got[bad[:5]]}, want {want[bad[:5]]}")
    for r in range(job.world):
        assert job.failure(r) is None, f"{label}: rank {r} recorded {job.failure(r)}"


@pytest.fixture(scope="module")
def build(request):
    """The kernels under test: the shipped ones, or ``--kernel-dir``'s."""
    from flashcomm_cupy.backends.flash import kernels
    kdir = request.config.getoption("--kernel-dir")
    return kernels.KernelBuild(os.path.abspath(kdir)) if kdir else kernels.SHIPPED


@pytest.fixture(scope="module", autouse=True)
def compiled(build):
    """Every module these tests load, compiled in parallel processes first (one after another
    they take minutes); a module that fails here fails again, with its error, where it is used."""
    from flashcomm_cupy.backends.flash import kernels
    from flashcomm_cupy.config import parse_bits
    from flashcomm_cupy.dtypes import KERNEL_DTYPE_CODE
    pairs = {parse_bits(b) for b, *_ in FLAG_MODES} | {parse_bits(b) for b in STAGED_BITS}
    specs = [(build, KERNEL_DTYPE_CODE[d], rs, ag, 32) for d in DTYPE_NAMES for rs, ag in pairs]
    specs += [(build, KERNEL_DTYPE_CODE[d], *parse_bits(b), e) for d in DTYPE_NAMES
              for b, g, *_ in LLQ_MODES for e in (8, 16) if g <= 32 * e]
    kernels.compile_in_parallel(specs, workers=os.cpu_count())


@pytest.fixture(scope="module")
def jobs(build):
    """One job per world size, shared by the exact tests (a failure test builds its own)."""
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    made = {}

    def get(world):
        if world not in made:
            made[world] = LoopbackJob(world, timeout_s=10.0, build=build)
        return made[world]

    yield get
    for job in made.values():
        job.close()


def run_exact(job, n, dtype, mode, force=None, protocol="auto", seed=11, host=None, expect_kernel=None):
    host = host or [host_input(seed, r, n, dtype) for r in range(job.world)]
    plan = job.plan(n, dtype, mode, force, protocol)
    if expect_kernel is not None:
        assert plan.kernel == expect_kernel, f"{mode.label} n={n} {dtype}: {plan.kernel}, not {expect_kernel}"
    outs = job.all_reduce([device(x) for x in host], mode, dtype=dtype, force=force, protocol=protocol,
                          fill=NAN16 if dtype != "float32" else np.nan)
    assert_reference(job, host, outs, mode, dtype, f"{plan.kernel} {mode.label} n={n} {dtype} world={job.world}")
    return plan


# ---------------------------------------------------------------------------------------------- exact
FLAG_MODES = [(None, 128, False, False), (4, 128, False, False), (4, 128, True, True), (6, 128, False, True),
              (6, 256, True, False), (8, 128, True, False), (8, 32, False, True), ((4, 8), 128, True, False),
              ((6, 4), 64, False, False), (4, 1024, True, False),
              (6, 32, True, False)]  # g32 rotated: a group one lane holds (the mode the README recommends)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("bits, group, rotate, sym", FLAG_MODES)
def test_flag_kernels_are_the_reference(jobs, world, algo, dtype, bits, group, rotate, sym):
    from flashcomm_cupy.config import Mode
    mode = Mode.make(bits, group, sym, rotate, algo)
    job = jobs(world)
    for n, shape in ((1, (128, 0, 1)), (4099, (64, 3, 1)), (65_537, (256, 8, 2)), (300_007, (512, 16, 1))):
        run_exact(job, n, dtype, mode, force=(*shape, "flag", False), expect_kernel=f"fc_{algo}")


STAGED_BITS = [4, 6, 8, (4, 8), (8, 4), (6, 4)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", STAGED_BITS)
@pytest.mark.parametrize("group, rotate, sym", [(128, False, False), (128, True, False), (128, False, True),
                                                (32, True, False)])  # g32 rotated: a group one lane holds
def test_staged_twoshot_is_the_reference(jobs, world, dtype, bits, group, rotate, sym):
    from flashcomm_cupy.config import Mode
    mode = Mode.make(bits, group, sym, rotate, "twoshot")
    job = jobs(world)
    for n, shape in ((127, (128, 16, 1)), (65_537, (64, 8, 3)), (262_147, (256, 0, 2))):
        run_exact(job, n, dtype, mode, force=(*shape, "flag", True), expect_kernel="fc_twoshot_staged")


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_lossless_ll_kernels_are_the_reference(jobs, world, algo, dtype):
    from flashcomm_cupy.config import Mode
    mode = Mode.make(None, algo=algo)
    job = jobs(world)
    for n in (1, 7, 9, 127, 4099) + ((65_537, 100_003) if world <= 4 else ()):  # what this GPU's share holds
        run_exact(job, n, dtype, mode, protocol="ll", expect_kernel=f"fc_ll_{algo}")


LLQ_MODES = [(4, 128, False, False), (4, 128, True, False), (4, 128, False, True), (4, 32, False, False),
             (4, 512, True, False), (4, 1024, True, True), (8, 128, False, False), (8, 128, True, False),
             (8, 32, False, True), ((4, 8), 128, True, False), (6, 64, False, True), (6, 256, True, False)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("algo", ["oneshot", "twoshot"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("bits, group, rotate, sym", LLQ_MODES)
def test_quantized_ll_kernels_are_the_reference(jobs, world, algo, dtype, bits, group, rotate, sym):
    from flashcomm_cupy.config import Mode
    mode = Mode.make(bits, group, sym, rotate, algo)
    job = jobs(world)
    for n in (1, 127, 4099, 65_537):
        plan = run_exact(job, n, dtype, mode, protocol="ll")
        assert plan.kernel == llq_kernel(plan, mode), plan


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("bits, group, rotate, sym", [m for m in LLQ_MODES if m[1] <= 256])
def test_the_quantized_ll_one_shot_is_the_reference_with_either_unit_size(jobs, monkeypatch, world, dtype, bits,
                                                                           group, rotate, sym):
    """Small one-shots run 8-element units (plan.LLQ_SMALL_UNIT_ELEMS); the same calls with
    16-element ones, as larger one-shots run them, give the same bits."""
    from flashcomm_cupy.backends.flash import plan as plan_module
    from flashcomm_cupy.config import Mode
    mode = Mode.make(bits, group, sym, rotate, "oneshot")
    job = jobs(world)
    for small_max, elems in ((plan_module.LLQ_SMALL_UNIT_MAX_ELEMS, 8), (-1, 16)):
        monkeypatch.setattr(plan_module, "LLQ_SMALL_UNIT_MAX_ELEMS", small_max)
        for n in (1, 127, 4099, 65_537):
            plan = run_exact(job, n, dtype, mode, protocol="ll")
            assert plan.kernel == llq_kernel(plan, mode) and plan.build.unit_elems == elems, plan


#: the modes whose one-shot runs 8-element units up to 1 MB of float16 (INT6/INT8 with groups
#: of at most 256; INT4's 8-element form takes more bytes, plan.llq_small_unit_max_elems)
ONE_UNIT_A_LANE_MODES = [(8, 128, False, False), (8, 128, True, False), (8, 32, False, True), (6, 32, False, False),
                         (6, 32, True, False), (6, 64, False, True), (6, 256, True, False)]


@pytest.fixture(scope="module")
def whole_gpu_pair(build):
    """Two ranks, each with the blocks a GPU of its own gives it, whose LL grids need not be
    resident together (LoopbackJob's ``unfit_ll_grids``: exact, not timed)."""
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    import cupy
    sms = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["multiProcessorCount"]
    with LoopbackJob(2, max_blocks=2 * sms, timeout_s=10.0, build=build, unfit_ll_grids=True) as job:
        yield job


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("bits, group, rotate, sym", ONE_UNIT_A_LANE_MODES)
def test_the_largest_small_unit_one_shot_holds_one_unit_a_lane_and_is_the_reference(whole_gpu_pair, dtype, bits,
                                                                                    group, rotate, sym):
    """At the 8-element one-shot's largest size (1 MB of float16: 256 blocks of 256 threads, two
    blocks an SM of a GPU of its own) every lane holds one unit, and the call is the reference's."""
    from flashcomm_cupy.backends.flash import plan as plan_module
    from flashcomm_cupy.config import Mode
    mode = Mode.make(bits, group, sym, rotate, "oneshot")
    force = (256, 0, 1, "ll", False)
    largest = plan_module.llq_small_unit_max_elems(mode.rs_bits)
    for n in (largest, largest - 1001, (largest >> 1) + 3):
        plan = run_exact(whole_gpu_pair, n, dtype, mode, force=force, protocol="ll")
        assert (plan.build.unit_elems, plan.units, plan.threads) == (8, 1, 256), plan
        assert plan.blocks == -(-plan.seg_elems // (256 * 8)) and plan.kernel == llq_kernel(plan, mode), plan
        if n == largest:  # the two grids together are more than the GPU holds at once
            from flashcomm_cupy.backends.flash import kernels
            from flashcomm_cupy.backends.flash.backend import resident_blocks
            fn = kernels.kernel(plan.kernel, plan.build, whole_gpu_pair.build)
            fit = resident_blocks(fn, plan.threads, plan.smem) * whole_gpu_pair.sm_count
            assert plan.blocks < fit < 2 * plan.blocks, (plan, fit)


def llq_kernel(plan, mode):
    """The quantized LL kernel a plan must run: a rotating one-shot of enough warps has its own
    build with shared butterflies (FcRotCode); the inputs above run both one-shot builds."""
    from flashcomm_cupy.backends.flash.plan import shares_rotation_code
    if plan.algo == "oneshot" and shares_rotation_code(mode, plan.blocks, plan.threads, plan.build.unit_elems):
        return "fc_llq_oneshot_rot"
    return f"fc_llq_{plan.algo}"


@pytest.mark.parametrize("world", [5, 8])
def test_eight_and_odd_world_sizes(jobs, world):
    """Every kernel kind at the largest and an odd world size (fewer modes: the same code paths)."""
    from flashcomm_cupy.config import Mode
    job = jobs(world)
    for dtype in ("float16", "float32"):
        for algo in ("oneshot", "twoshot"):
            for bits in (None, 4, 8, (4, 8)):
                mode = Mode.make(bits, 128, False, bits == (4, 8), algo)
                run_exact(job, 70_001, dtype, mode, force=(256, 0, 1, "flag", False), expect_kernel=f"fc_{algo}")
                run_exact(job, 4099, dtype, mode, protocol="ll")
    run_exact(job, 300_007, "float16", Mode.make(6, 128, False, True, "twoshot"), force=(256, 0, 2, "flag", True),
              expect_kernel="fc_twoshot_staged")


def test_a_long_mixed_sequence_is_the_reference(jobs):
    """Many calls of every kernel in a random order on one job: flag sets, epochs, LL slot
    parities and counters are shared between them and must never mix up two calls."""
    import cupy
    from flashcomm_cupy import flash_all_reduce_reference
    from flashcomm_cupy.config import Mode
    job = jobs(3)
    cases = []
    for i, n in enumerate((3, 4099, 50_001, 262_144)):
        host = [host_input(300 + i, r, n, "float16") for r in range(job.world)]
        for mode, force, protocol in (
                (Mode.make(None, algo="oneshot"), None, "ll"), (Mode.make(None, algo="twoshot"), None, "ll"),
                (Mode.make(4, algo="twoshot"), None, "ll"), (Mode.make(8, rotate=True, algo="oneshot"), None, "ll"),
                (Mode.make(4, algo="twoshot"), (256, 0, 1, "flag", False), "auto"),
                (Mode.make(6, rotate=True, algo="twoshot"), (128, 0, 2, "flag", True), "auto"),
                (Mode.make(None, algo="oneshot"), (128, 0, 1, "flag", False), "auto"),
                (Mode.make((4, 8), algo="oneshot"), (256, 0, 1, "flag", False), "auto")):
            want = flash_all_reduce_reference(host, mode=mode)[0]
            plan = job.plan(n, "float16", mode, force, protocol)
            cases.append(([device(x) for x in host], mode, plan, bits_of(want)))
    order = np.random.default_rng(5).integers(0, len(cases), size=600)
    outs = [[cupy.empty_like(x) for x in c[0]] for c in cases]
    wrong = []
    for k in order:
        ins, mode, plan, want = cases[k]
        job.launch(ins, outs[k], mode, plan)
        job.synchronize()
        for r in range(job.world):
            if not np.array_equal(bits_of(outs[k][r]), want):
                wrong.append((int(k), r, plan.kernel, mode.label))
    assert not wrong, f"{len(wrong)} wrong results, first {wrong[:3]}"
    assert all(job.failure(r) is None for r in range(job.world))


# ---------------------------------------------------------------------------------------------- failures
FAULT_CASES = [  # (label, bits, rotate, algo, force, protocol, n)
    ("flag one-shot", 8, False, "oneshot", (256, 0, 1, "flag", False), "auto", 65_536),
    ("flag two-shot", 4, False, "twoshot", (256, 0, 1, "flag", False), "auto", 1 << 20),
    ("staged two-shot", 4, False, "twoshot", (256, 0, 2, "flag", True), "auto", 1 << 20),
    ("lossless flag two-shot", None, False, "twoshot", (256, 0, 1, "flag", False), "auto", 1 << 20),
    ("LL one-shot", None, False, "oneshot", None, "ll", 4096),
    ("LL two-shot", None, False, "twoshot", None, "ll", 65_536),
    ("quantized LL one-shot", 4, False, "oneshot", None, "ll", 4096),
    ("rotating quantized LL one-shot", 4, True, "oneshot", None, "ll", 131_072),
    ("quantized LL two-shot", 8, False, "twoshot", None, "ll", 65_536),
]


def assert_one_failure(rec, rank, absent, label):
    """A record describes one failure, never fields of several (every block of a rank that gives up
    records at once): a timeout names the rank it waited for as the one that was late too, and a
    poisoning names a rank that gave up, which the absent rank, not yet launched, cannot be."""
    from flashcomm_cupy.backends.flash.layout import ERR_TIMEOUT
    if rec["code"] == ERR_TIMEOUT:
        assert rec["late"] == rec["peer"], f"{label}: a mixed record {rec}"
    else:
        assert rec["peer"] not in (rank, absent), f"{label}: a mixed record {rec}"


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("label, bits, rotate, algo, force, protocol, n", FAULT_CASES,
                         ids=[c[0] for c in FAULT_CASES])
def test_an_absent_then_late_rank_leaves_nan_and_an_error_everywhere(build, world, label, bits, rotate, algo, force,
                                                                      protocol, n):
    """The last rank does not launch: every other rank gives up within the bound, records it and
    writes NaN.  Then it launches, late: it finds the poison, records who gave up, writes NaN.
    Every later call on the job is NaN on every rank (poisoned until rebuilt)."""
    import time

    from flashcomm_cupy.backends.flash.layout import ERR_POISON, ERR_TIMEOUT
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    from flashcomm_cupy.config import Mode
    mode = Mode.make(bits, 128, False, rotate, algo)
    host = [host_input(7, r, n, "float16") for r in range(world)]
    late = world - 1
    with LoopbackJob(world, timeout_s=0.5, build=build) as job:
        ins = [device(x) for x in host]
        plan = job.plan(n, "float16", mode, force, protocol)
        assert plan.protocol == ("ll" if protocol == "ll" else "staged" if force[4] else "flag"), plan
        assert protocol != "ll" or bits is None or plan.kernel == llq_kernel(plan, mode), plan
        assert label.startswith("rotating") == (plan.kernel == "fc_llq_oneshot_rot"), plan
        job.all_reduce(ins, mode, dtype="float16", force=force, protocol=protocol)  # one good call first
        outs = [device(np.zeros(n, np.float16)) for _ in range(world)]
        start = time.monotonic()
        job.launch(ins, outs, mode, plan, ranks=range(late))
        job.synchronize()
        waited = time.monotonic() - start
        assert waited < 0.5 + 5.0, f"{label}: the others took {waited:.1f} s to give up"
        for r in range(late):
            rec = job.failure(r)
            assert rec is not None and rec["code"] in (ERR_TIMEOUT, ERR_POISON), f"{label}: rank {r}: {rec}"
            assert_one_failure(rec, r, late, f"{label}: rank {r}")
            assert all_nan(outs[r], "float16"), f"{label}: rank {r} returned finite values after giving up"
        job.launch(ins, outs, mode, plan, ranks=[late])
        job.synchronize()
        rec = job.failure(late)
        assert rec is not None and rec["code"] == ERR_POISON, f"{label}: the late rank recorded {rec}"
        assert_one_failure(rec, late, late, f"{label}: the late rank")
        assert all_nan(outs[late], "float16"), f"{label}: the late rank returned finite values"
        again = job.all_reduce(ins, mode, dtype="float16", force=force, protocol=protocol)
        for r in range(world):
            assert all_nan(again[r], "float16"), f"{label}: rank {r}'s next call on the poisoned job is finite"


def test_graph_replays_after_a_stall_are_nan_on_every_rank(build):
    """A CUDA graph of three calls (LL one-shot, flag two-shot, staged two-shot) on every rank:
    exact on every replay; then rank 0 runs the same calls alone and gives up (a stall past the
    bound), and every later replay leaves NaN -- never a finite value -- and a record on every rank."""
    import cupy
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    from flashcomm_cupy.config import Mode
    from flashcomm_cupy import flash_all_reduce_reference
    specs = [(1 << 12, Mode.make(None, algo="oneshot"), None, "ll"),
             (1 << 16, Mode.make(4, algo="twoshot"), (256, 0, 1, "flag", False), "auto"),
             (1 << 20, Mode.make(8, algo="twoshot"), (256, 0, 2, "flag", True), "auto")]
    with LoopbackJob(2, timeout_s=0.5, build=build) as job:
        calls = []
        for k, (n, mode, force, protocol) in enumerate(specs):
            host = [host_input(40 + k, r, n, "float16") for r in range(2)]
            want = bits_of(flash_all_reduce_reference(host, mode=mode)[0])
            calls.append(([device(x) for x in host], [cupy.zeros(n, cupy.float16) for _ in range(2)], mode,
                          job.plan(n, "float16", mode, force, protocol), want))
        cupy.cuda.Device().synchronize()
        origin = job.streams[0]
        graph = job.capture([call[:4] for call in calls])
        for _ in range(3):
            graph.launch(origin)
            origin.synchronize()
            for _, outs, mode, plan, want in calls:
                for r in range(2):
                    assert np.array_equal(bits_of(outs[r]), want), f"{plan.kernel}: rank {r} before the stall"
        for ins, outs, mode, plan, _ in calls:  # rank 0 alone: it gives up on rank 1
            job.launch(ins, outs, mode, plan, ranks=[0])
        job.synchronize()
        assert job.failure(0) is not None
        for _ in range(2):
            for _, outs, *_ in calls:
                for o in outs:
                    o.fill(0)
            cupy.cuda.Device().synchronize()
            graph.launch(origin)
            origin.synchronize()
            for _, outs, mode, plan, _ in calls:
                for r in range(2):
                    assert all_nan(outs[r], "float16"), f"{plan.kernel}: rank {r} replayed after the stall"
        assert job.failure(1) is not None, "rank 1 replayed on a poisoned job and recorded nothing"


def test_an_epoch_gap_of_two_to_the_31_and_the_counters_wrapping_stay_exact(jobs):
    """One algorithm runs past 2^31 rounds while the other idles (the two-shot's epochs and flags
    moved ahead on every rank), then both run, then both counters wrap past 2^32: always exact."""
    import cupy
    from flashcomm_cupy.config import Mode
    job = jobs(3)
    lay, mb = job.layout, job.layout.max_blocks

    def words(r, off, count):
        return job.ws[r][off:off + 4 * count].view(cupy.uint32)

    def jump(epoch_off, flag_sets, value):
        cupy.cuda.Device().synchronize()  # nobody is inside a kernel
        for r in range(job.world):
            words(r, epoch_off, mb)[...] = value
            for k in flag_sets:  # what every peer has signalled so far: the same round
                words(r, lay.flags_off + k * lay.flag_set_bytes, lay.flag_set_bytes // 4)[...] = value
        cupy.cuda.Device().synchronize()

    def run(algo, calls):
        for _ in range(calls):
            run_exact(job, 1 << 18, "float16", Mode.make(4, algo=algo), force=(256, 0, 1, "flag", False),
                      expect_kernel=f"fc_{algo}")

    run("twoshot", 3)
    run("oneshot", 3)
    jump(lay.ts_epoch_off, (0, 1), np.uint32(0x80000010))  # the two-shot ran 2^31 rounds alone
    run("oneshot", 5)
    run("twoshot", 5)
    jump(lay.os_epoch_off, (2,), np.uint32(0xFFFFFFF0))  # both counters wrap past 2^32
    jump(lay.ts_epoch_off, (0, 1), np.uint32(0xFFFFFFF0))
    run("oneshot", 20)
    run("twoshot", 20)


def test_grids_that_cannot_all_be_resident_are_refused():
    """A plan whose grids would not all fit the GPU at once is refused before anything launches
    (block b of one rank waits for block b of the others: it would time out, not hang)."""
    from flashcomm_cupy.backends.flash.loopback import LoopbackJob
    from flashcomm_cupy.config import Mode
    with LoopbackJob(2, max_blocks=1024, timeout_s=0.5) as job:
        mode = Mode.make(4, algo="twoshot")
        n = 32 << 20
        plan = job.plan(n, "float16", mode, (512, 1024, 1, "flag", False))
        assert plan.blocks == 1024 // 2, plan  # 512-thread blocks: half the workspace's blocks
        x = [device(np.zeros(n, np.float16)) for _ in range(2)]
        with pytest.raises(ValueError, match="do not fit this GPU"):
            job.launch(x, x, mode, plan)
