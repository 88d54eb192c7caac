"""Every CUDA source in ``kernels_cu/`` compiles with nvcc for T4, A100, L40/4090 and H100.

At run time the kernels are built by NVRTC (through CuPy) once per
specialisation (``FC_DT`` element type x ``FC_RS_BITS``/``FC_AG_BITS``
codecs, and ``FC_ELEMS`` unit size); this test builds the same specialisations ahead of time with nvcc,
so a syntax or template error shows up in CI, which has nvcc but no GPU.
Skipped when nvcc is absent.

Each build runs once per session (:func:`builds`, all of them in parallel) and every test reads
what it needs from it: the register counts of the LL launches come from the same builds'
``-Xptxas -v`` output.  The host/kernel layout checks are ``static_assert`` s, decided by the
front end, so they compile with ``-fdevice-syntax-only`` (a second instead of a full build).
A build that succeeded is remembered across runs, keyed by the SHA-256 of every file in
``kernels_cu/``, the nvcc command and ``nvcc --version`` (identical inputs give the identical
result): ``$FLASHCOMM_NVCC_CACHE`` is the folder (default ``~/.cache/flashcomm/nvcc-checks``),
``off`` to rebuild everything.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import pytest

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels_cu"
ARCHS = ("sm_75", "sm_80", "sm_89", "sm_90")
#: the arch every specialisation is built for (the H100s the kernels are tuned on)
SPECIALISATION_ARCH = "sm_90"
DTYPE_CODES = (0, 1, 2)  # float16, bfloat16, float32 (flashcomm_cupy.dtypes.KERNEL_DTYPE_CODE)
#: (reduce-scatter bits, all-gather bits) built for every dtype: lossless and the CLI's modes
COMMON_BIT_PAIRS = ((0, 0), (4, 4), (6, 6), (8, 8), (4, 8))
#: the other pairs a Mode allows, built for one dtype (they only recombine the codecs above)
OTHER_BIT_PAIRS = tuple(p for p in itertools.product((4, 6, 8), repeat=2) if p not in COMMON_BIT_PAIRS)


def _nvcc():
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


def _sources():
    return sorted(KERNEL_DIR.glob("*.cu"))


def _jobs():
    """(source, arch, defines) for every compile this test runs."""
    jobs = [(src, arch, ()) for src in _sources() for arch in ARCHS]
    for src in _sources():
        if "FC_RS_BITS" not in src.read_text():
            continue
        specs = list(itertools.product(DTYPE_CODES, COMMON_BIT_PAIRS))
        # the other pairs for float16, and for float32 (the most registers: the LL check reads them)
        specs += [(dt, pair) for dt in (DTYPE_CODES[0], DTYPE_CODES[2]) for pair in OTHER_BIT_PAIRS]
        for dt, (rs, ag) in specs:
            jobs.append((src, SPECIALISATION_ARCH, (f"FC_DT={dt}", f"FC_RS_BITS={rs}", f"FC_AG_BITS={ag}")))
        # 16-element units (the quantized LL kernels', flashcomm_cupy.backends.gpu.llq_unit_elems)
        specs16 = list(itertools.product(DTYPE_CODES, COMMON_BIT_PAIRS[1:]))
        specs16 += [(DTYPE_CODES[2], pair) for pair in OTHER_BIT_PAIRS]
        for dt, (rs, ag) in specs16:
            jobs.append((src, SPECIALISATION_ARCH, (f"FC_DT={dt}", f"FC_RS_BITS={rs}", f"FC_AG_BITS={ag}",
                                                    "FC_ELEMS=16")))
        # 8-element units (the small quantized LL one-shot's, plan.LLQ_SMALL_UNIT_ELEMS): the same builds
        for dt, (rs, ag) in specs16:
            jobs.append((src, SPECIALISATION_ARCH, (f"FC_DT={dt}", f"FC_RS_BITS={rs}", f"FC_AG_BITS={ag}",
                                                    "FC_ELEMS=8")))
        # the leave-one-stage-out timing variants of benchmarks/kernel_variants.py
        jobs.append((src, SPECIALISATION_ARCH, ("FC_DT=0", "FC_RS_BITS=4", "FC_AG_BITS=4",
                                                "FC_PROFILE_NO_WAIT", "FC_PROFILE_LOCAL_DATA")))
        # ... and the rotation A/B's (rotations run three times: kernel_variants.py --cases rot, "rot3")
        jobs.append((src, SPECIALISATION_ARCH, ("FC_DT=0", "FC_RS_BITS=6", "FC_AG_BITS=6", "FC_ELEMS=16",
                                                "FC_PROFILE_ROT_TIMES=3")))
    return jobs


def test_kernel_sources_exist():
    sources = _sources()
    assert sources, f"no .cu files in {KERNEL_DIR}"
    from flashcomm_cupy import _kernels
    assert (KERNEL_DIR / _kernels.KERNEL_SOURCE) in sources


@dataclass(frozen=True)
class Build:
    """One nvcc run: did it produce a non-empty output, the command, and nvcc's output (ptxas -v included)."""

    ok: bool
    cmd: str
    log: str


def _kernel_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(KERNEL_DIR.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout


def _cache_dir() -> Optional[Path]:
    value = os.environ.get("FLASHCOMM_NVCC_CACHE", "")
    if value.lower() in ("off", "0", "no"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "flashcomm" / "nvcc-checks"


def _run_nvcc(nvcc: str, args: Sequence[str], out: Path, digest: str) -> Build:
    """``nvcc *args -o out``, or its remembered success for identical kernels, command and nvcc."""
    cmd = [nvcc, *args, "-o", str(out)]
    shown = " ".join(args)
    cache = _cache_dir()
    # the key names kernels_cu/ by its contents (digest), not its path: every checkout and CI's
    # fresh clone share the builds of identical sources
    where = shown.replace(str(KERNEL_DIR), "<kernels_cu>")
    key = hashlib.sha256(f"{digest}\n{where}\n{_nvcc_version(nvcc)}".encode()).hexdigest()
    entry = cache / f"{key}.json" if cache is not None else None
    if entry is not None and entry.is_file():
        return Build(True, shown, json.loads(entry.read_text())["log"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    build = Build(proc.returncode == 0 and out.is_file() and out.stat().st_size > 0, shown,
                  proc.stdout + proc.stderr)
    if build.ok and entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"cmd": shown, "log": build.log}))
            tmp.replace(entry)
        except OSError:
            pass  # a cache that cannot be written only costs time
    return build


def _build_args(src: Path, arch: str, defines: Sequence[str]) -> Tuple[str, ...]:
    # -Xptxas -v: the register counts that test_every_quantized_ll_launch_fits_two_blocks_per_sm reads
    return ("-cubin", f"-arch={arch}", "-std=c++17", f"-I{KERNEL_DIR}", *(f"-D{d}" for d in defines),
            "-Xptxas", "-v", str(src))


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Dict[tuple, Build]:
    """Every build of :func:`_jobs`, run once, in parallel: ``{(source, arch, defines): Build}``."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    out_dir = tmp_path_factory.mktemp("cubins")
    digest = _kernel_digest()
    jobs = _jobs()

    def build(index_job):
        index, (src, arch, defines) = index_job
        return _run_nvcc(nvcc, _build_args(src, arch, defines), out_dir / f"{src.stem}-{arch}-{index}.cubin",
                         digest)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 2))) as pool:
        results = list(pool.map(build, enumerate(jobs)))
    return dict(zip(jobs, results))


def test_every_kernel_source_compiles(builds):
    assert builds, f"no .cu files in {KERNEL_DIR}"
    failed = [b for b in builds.values() if not b.ok]
    assert not failed, f"{len(failed)} of {len(builds)} compiles failed:\n" + "\n\n".join(
        f"nvcc {b.cmd}\n{b.log[-3000:]}" for b in failed[:5])


def _assert_compiles_with(tmp_path, name, checks, defines):
    """Compile fc_allreduce.cu plus ``checks`` (static_asserts) with ``defines``; fail with nvcc's log.

    ``static_assert`` is decided by the front end, so the device side stops after it
    (``-fdevice-syntax-only``: a second instead of a full build; a failing assert still fails)."""
    src = tmp_path / f"{name}.cu"
    src.write_text('#include "fc_allreduce.cu"\n' + "\n".join(checks) + "\n")
    build = _run_nvcc(_nvcc(), ("-c", "-fdevice-syntax-only", f"-arch={SPECIALISATION_ARCH}", "-std=c++17",
                                f"-I{KERNEL_DIR}", *(f"-D{d}" for d in defines), str(src)),
                      tmp_path / f"{name}.o", _kernel_digest() + "\n".join(checks))
    assert build.ok, build.log


def test_kernel_argument_struct_matches_the_host_mirror(tmp_path):
    """``_kernels.ARGS_DTYPE`` (what the host fills) has FcArgs' exact field offsets and size (fc_args.cuh
    pins the same numbers on the device side), and ``FLAG_*`` are the kernels' flag bits."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    from flashcomm_cupy import _kernels
    dt = _kernels.ARGS_DTYPE
    device_name = {"in_ptr": "in", "out_ptr": "out"}
    checks = [f'static_assert(__builtin_offsetof(FcArgs, {device_name.get(f, f)}) == {dt.fields[f][1]}, "{f}");'
              for f in dt.names]
    checks.append(f'static_assert(sizeof(FcArgs) == {dt.itemsize}, "sizeof(FcArgs)");')
    checks += [f'static_assert(FC_FLAG_ROTATE == {_kernels.FLAG_ROTATE}, "FcArgs.flags: rotate");',
               f'static_assert(FC_FLAG_SYM == {_kernels.FLAG_SYM}, "FcArgs.flags: symmetric");']
    _assert_compiles_with(tmp_path, "args_layout", checks, ("FC_DT=0", "FC_RS_BITS=0", "FC_AG_BITS=0"))


def test_the_error_record_and_its_codes_match_the_host_mirror(tmp_path):
    """``_kernels.ERROR_FIELDS`` / ``ERR_*`` (what the host reads after a failed wait) are FcError's
    words in order and fc_signal.cuh's codes, and the poison word can never be 0."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    from flashcomm_cupy import _kernels
    from flashcomm_cupy.backends.ipc import POISON_AREA_BYTES, POISON_PEERS_OFF
    checks = [f'static_assert(__builtin_offsetof(FcError, {f}) == {4 * i}, "{f}");'
              for i, f in enumerate(_kernels.ERROR_FIELDS)]
    checks += [f'static_assert(sizeof(FcError) == {4 * len(_kernels.ERROR_FIELDS)}, "sizeof(FcError)");',
               f'static_assert(FC_ERR_TIMEOUT == {_kernels.ERR_TIMEOUT}u, "timeout code");',
               f'static_assert(FC_ERR_POISON == {_kernels.ERR_POISON}u, "poison code");',
               f'static_assert(FC_ERR_NODE == {_kernels.ERR_NODE}u, "node code");',
               f'static_assert(FC_LATE_OTHER_NODE == {_kernels.LATE_OTHER_NODE}u, "another node");',
               'static_assert((FC_POISON & 0xFFu) == 0 && FC_POISON != 0, "poison word names a rank in its low byte");',
               f'static_assert(FC_POISON_PEERS_OFF == {POISON_PEERS_OFF}, "poison area: peer table");',
               f'static_assert(FC_POISON_AREA_BYTES == {POISON_AREA_BYTES}, "poison area size");']
    _assert_compiles_with(tmp_path, "error_record", checks, ("FC_DT=0", "FC_RS_BITS=0", "FC_AG_BITS=0"))


def test_the_kernels_rotation_signs_are_the_references(tmp_path):
    """The sign words the kernels read (fc_sign_words, bit b of word k = element 32k + b is
    negative) are hadamard.signs for every element of the largest group."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    from flashcomm_cupy import hadamard
    negative = hadamard.signs(1024).reshape(32, 32) < 0
    words = [sum(1 << b for b in range(32) if negative[k, b]) for k in range(32)]
    checks = [f'static_assert(fc_sign_words().w[{k}] == {w}u, "sign word {k}");' for k, w in enumerate(words)]
    _assert_compiles_with(tmp_path, "rotation_signs", checks, ("FC_DT=0", "FC_RS_BITS=4", "FC_AG_BITS=4"))


def test_each_lanes_rotation_signs_are_the_references(tmp_path):
    """What a lane of a group works out as its sign bits (fc_rotation_signs: bit i for element
    lane * E + i, a select tree over the sign words) is hadamard.signs for every lane of the
    largest group a warp holds, at both unit sizes E."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    from flashcomm_cupy import hadamard
    for elems in (8, 16, 32):
        negative = hadamard.signs(32 * elems).reshape(32, elems) < 0
        checks = [f'static_assert((fc_rotation_signs({lane}) & 0x{(1 << elems) - 1:x}u) == '
                  f'{sum(1 << i for i in range(elems) if negative[lane, i])}u, "lane {lane}");' for lane in range(32)]
        _assert_compiles_with(tmp_path, f"rotation_signs_{elems}", checks,
                              ("FC_DT=0", "FC_RS_BITS=4", "FC_AG_BITS=4", f"FC_ELEMS={elems}"))


def test_the_hosts_ll_unit_sizes_and_thread_caps_match_the_kernels(tmp_path):
    """LLQ_UNIT_BYTES and LLQ_MAX_THREADS (what the host tiles by) are FcLLq's and FC_LLQ_THREADS, and
    the two-shot's launch bound (FC_LLQ_TWOSHOT_THREADS) is the block the host runs (llq_threads)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    from flashcomm_cupy.backends.gpu import LLQ_MAX_THREADS, LLQ_UNIT_BYTES, llq_threads
    for elems in (8, 16, 32):
        checks = [f'static_assert(FcLLq<{bits}>::BYTES == {LLQ_UNIT_BYTES[elems, bits]}, "unit bytes {bits}");'
                  for bits in (4, 6, 8)]
        checks.append(f'static_assert(FC_LLQ_THREADS == {LLQ_MAX_THREADS[elems]}, "threads");')
        _assert_compiles_with(tmp_path, f"llq_{elems}", checks,
                              ("FC_DT=0", "FC_RS_BITS=4", "FC_AG_BITS=4", f"FC_ELEMS={elems}"))
        if elems == 8:  # an 8-element build holds the one-shot alone
            continue
        for rs, ag in ((4, 4), (6, 6), (8, 8), (4, 8)):
            want = llq_threads(elems, 2, "twoshot", rs, ag)
            _assert_compiles_with(tmp_path, f"llq_{elems}_{rs}_{ag}",
                                  [f'static_assert(FC_LLQ_TWOSHOT_THREADS == {want}, "two-shot threads");'],
                                  ("FC_DT=0", f"FC_RS_BITS={rs}", f"FC_AG_BITS={ag}", f"FC_ELEMS={elems}"))


def test_the_hosts_staged_shared_memory_matches_the_kernel(tmp_path):
    """staged_twoshot_smem (the dynamic shared memory the host passes the staged two-shot)
    is FcStagedTwoshot's per-warp size for every codec pair, world size and block size."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    from flashcomm_cupy.backends.gpu import STAGE_VECS, staged_twoshot_smem, staged_unit_chunks
    checks = [f'static_assert(FC_STAGE_VECS == {STAGE_VECS}, "stage");']
    checks += [f'static_assert(FcStaged<{bits}>::CHUNKS == {staged_unit_chunks(bits)}, "unit {bits}");'
               for bits in (4, 6, 8)]
    for dt, (rs, ag), world, threads in itertools.product((0, 1), COMMON_BIT_PAIRS[1:] + OTHER_BIT_PAIRS,
                                                          range(2, 9), (64, 128, 256, 512)):
        want = staged_twoshot_smem(2, rs, ag, world, threads)
        checks.append(f'static_assert(FcStagedTwoshot<{dt}, {rs}, {ag}>::warp_chunks({world}) * 16 * {threads // 32}'
                      f' == {want}, "smem {dt} {rs}/{ag} world {world} threads {threads}");')
    _assert_compiles_with(tmp_path, "staged", checks, ("FC_DT=0", "FC_RS_BITS=4", "FC_AG_BITS=4"))


def _registers(ptxas_log: str) -> dict:
    """{kernel: registers per thread} from ``-Xptxas -v`` output."""
    regs, current = {}, None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            regs[current] = int(m.group(1))
    return regs


def test_every_quantized_ll_launch_fits_two_blocks_per_sm(builds):
    """The LL slot-reuse argument needs every launched block resident: at the host's thread cap
    (``llq_threads``) two blocks of each quantized LL kernel must fit an SM's registers."""
    from flashcomm_cupy.backends.gpu import SM_REGISTERS, llq_threads
    specs = [(e, dt, pair) for e in (8, 16, 32) for dt in DTYPE_CODES for pair in COMMON_BIT_PAIRS[1:]]
    specs += [(e, 2, pair) for e in (8, 16, 32) for pair in OTHER_BIT_PAIRS]  # float32: the most registers
    source = KERNEL_DIR / "fc_allreduce.cu"

    def registers(elems, dt, rs, ag):
        defines = (f"FC_DT={dt}", f"FC_RS_BITS={rs}", f"FC_AG_BITS={ag}") + ((f"FC_ELEMS={elems}",) if elems != 32 else ())
        build = builds[(source, SPECIALISATION_ARCH, defines)]  # FC_ELEMS defaults to 32
        assert build.ok, build.log
        return _registers(build.log)

    found = [registers(elems, dt, rs, ag) for elems, dt, (rs, ag) in specs]
    over = []
    for (elems, dt, (rs, ag)), regs in zip(specs, found):
        itemsize = 4 if dt == 2 else 2
        for kernel, algo in (("fc_llq_oneshot", "oneshot"), ("fc_llq_oneshot_rot", "oneshot"),
                             ("fc_llq_twoshot", "twoshot")):
            if kernel not in regs and elems == 8:  # an 8-element build holds the one-shot alone
                continue
            used = regs[kernel]
            threads = llq_threads(elems, itemsize, algo, rs, ag)
            if 2 * threads * (-(-used // 8) * 8) > SM_REGISTERS:  # registers go to threads in steps of 8
                over.append(f"FC_ELEMS={elems} dt={dt} {rs}/{ag} {kernel}: {used} registers x {threads} threads")
    assert not over, "two blocks do not fit an SM:\n" + "\n".join(over)


@pytest.mark.parametrize("header", sorted(p.name for p in KERNEL_DIR.glob("*.cuh")))
def test_every_header_compiles_on_its_own(tmp_path, header):
    """Each header includes what it uses (the headers are built bottom-up; fc_allreduce.cu lists them),
    so any one of them can be included first."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    src = tmp_path / f"only_{header}.cu"
    src.write_text(f'#include "{header}"\n')
    build = _run_nvcc(nvcc, ("-c", "-fdevice-syntax-only", f"-arch={SPECIALISATION_ARCH}", "-std=c++17",
                             f"-I{KERNEL_DIR}", str(src)), tmp_path / f"only_{header}.o", _kernel_digest() + header)
    assert build.ok, build.log
