"""codecs.py: one spec per bit width, and the CUDA side agreeing with it."""
from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

from flashcomm_cupy import codecs, quant
from flashcomm_cupy.config import SUPPORTED_BITS, Codec

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels_cu"


def test_every_supported_bit_width_has_a_spec():
    assert tuple(codecs.CODECS) == SUPPORTED_BITS
    with pytest.raises(ValueError, match="bits"):
        codecs.spec(5)


@pytest.mark.parametrize("bits,group,sym", list(itertools.product(SUPPORTED_BITS, (32, 128, 1024), (False, True))))
def test_the_reference_wire_chunk_is_laid_out_from_the_spec(bits, group, sym):
    spec, codec = codecs.spec(bits), Codec(bits, group, sym)
    n = 4 * group
    lay = quant.plane_layout(n, codec)
    lo, hi = spec.plane_bytes(n)
    assert lay["lo"][1] == lo and lay.get("hi", (0, 0))[1] == hi
    codes = 8 * (lo + hi)  # every code bit is in a plane
    assert codes == n * bits
    assert spec.wire_bytes_per_element(group, sym) == codec.wire_bytes_per_element()


def test_unit_sizes_in_the_ll_form_and_the_staged_form():
    # FcLLq<BITS>::BYTES: code words plus at least one metadata word, whole 16-byte vectors
    assert {(e, b): codecs.spec(b).ll_unit_bytes(e) for e in (16, 32) for b in SUPPORTED_BITS} == \
        {(16, 4): 16, (16, 6): 32, (16, 8): 32, (32, 4): 32, (32, 6): 48, (32, 8): 64}
    assert [codecs.spec(b).staged_chunks(32) for b in SUPPORTED_BITS] == [52, 70, 88]


def test_wide_is_decided_once():
    assert codecs.tuning_class(None, None) == codecs.LOSSLESS
    assert codecs.tuning_class(4, 4) == codecs.NARROW
    for rs, ag in ((4, 8), (8, 4), (6, 6), (8, 8)):
        assert codecs.tuning_class(rs, ag) == codecs.WIDE


def test_the_cuda_spec_header_is_current():
    """kernels_cu/fc_codec_spec.cuh is what ``python -m flashcomm_cupy.codecs`` writes."""
    assert (KERNEL_DIR / "fc_codec_spec.cuh").read_text() == codecs.cuda_header()


@pytest.mark.parametrize("elems", codecs.UNIT_ELEMS)
def test_the_kernels_agree_with_the_spec(tmp_path, elems):
    """fc_codec_spec.cuh's static_asserts hold for the kernels' FcUnit / FcLLq / FcStaged (nvcc front end only)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    src = tmp_path / "spec.cu"
    src.write_text('#include "fc_allreduce.cu"\n#include "fc_codec_spec.cuh"\n')
    cmd = [nvcc, "-c", "-fdevice-syntax-only", "-arch=sm_90", "-std=c++17", f"-I{KERNEL_DIR}", "-DFC_DT=0",
           "-DFC_RS_BITS=4", "-DFC_AG_BITS=4", f"-DFC_ELEMS={elems}", str(src), "-o", str(tmp_path / "spec.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
