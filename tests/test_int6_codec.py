"""The kernels' INT6 packing (fc_quant.cuh: fc_int6_pack16 / fc_int6_unpack16) is quant.pack's, and so
is the magic constant INT6's symmetric quantizer rounds with.

The packing helpers are host-and-device code (fc_byte_perm has a host twin of PRMT), so nvcc builds
them into a small host program that packs what this test sends it.  They are built only of byte
permutes, shifts and bit selects with constant masks, so every output bit is a copy of one input bit
or 0: the output is linear over GF(2) in the input bits, as quant.pack's is.  The output for every
single input bit set (and for all bits clear) therefore decides the output for every input; random
units check the same through the full path.  Skipped when nvcc is absent.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flashcomm_cupy import quant
from flashcomm_cupy.config import Codec

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels_cu"
CODES = 16  # one call of the helpers
LO_WORDS, HI_WORDS = 2, 1  # its planes: 16 nibbles, 16 two-bit fields
CODEC = Codec(6, 32, symmetric=True)  # the planes do not depend on the group or the metadata
MAGIC_BITS = 0x4B400000  # FC_MAGIC_BITS: what the quantizer's words hold above their code byte

HOST_PROGRAM = r"""
#include <cstdio>
#include "fc_quant.cuh"
// argv[1] "pack": records of 16 words (code i in word i's low byte) -> lo0 lo1 hi
//         "unpack": records of lo0 lo1 hi -> the four code words
int main(int argc, char** argv) {
  const bool pack = argc > 1 && argv[1][0] == 'p';
  fc_u32 in[16], out[4];
  const int nin = pack ? 16 : 3, nout = pack ? 3 : 4;
  while (fread(in, 4, nin, stdin) == (size_t)nin) {
    if (pack) {
      fc_u32 q[16];
      for (int i = 0; i < 16; ++i) q[i] = in[i];
      fc_int6_pack16(q, out[0], out[1], out[2]);
    } else {
      fc_int6_unpack16(in[0], in[1], in[2], out);
    }
    fwrite(out, 4, nout, stdout);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    """Run the host build of the packing helpers: ``helpers("pack" | "unpack", uint32 records) -> uint32 records``."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit absent)")
    where = tmp_path_factory.mktemp("int6")
    src, exe = where / "int6_packing.cu", where / "int6_packing"
    src.write_text(HOST_PROGRAM)
    build = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", f"-I{KERNEL_DIR}", "-DFC_DT=0", "-DFC_RS_BITS=6",
                            "-DFC_AG_BITS=6", str(src), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]

    def run(mode: str, records: np.ndarray) -> np.ndarray:
        records = np.ascontiguousarray(records, dtype="<u4")
        proc = subprocess.run([str(exe), mode], input=records.tobytes(), capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return np.frombuffer(proc.stdout, dtype="<u4").reshape(len(records), -1)

    return run


def reference_planes(codes: np.ndarray) -> np.ndarray:
    """quant.pack's planes of each row of 16 codes, as (lo0, lo1, hi) little-endian words."""
    n = codes.size
    buf = quant.pack(codes.reshape(-1), np.zeros(n // CODEC.group_size, np.float32), None, CODEC)
    lay = quant.plane_layout(n, CODEC)
    (lo_at, lo_n), (hi_at, hi_n) = lay["lo"], lay["hi"]
    lo = buf[lo_at:lo_at + lo_n].view("<u4").reshape(-1, LO_WORDS)
    hi = buf[hi_at:hi_at + hi_n].view("<u4").reshape(-1, HI_WORDS)
    return np.concatenate([lo, hi], axis=1)


def code_words(codes: np.ndarray) -> np.ndarray:
    """What fc_int6_unpack16 returns for each row of 16 codes: byte b of word m is code 4b + m."""
    c = codes.astype(np.uint32).reshape(-1, 4, 4)  # [row, b, m]
    return (c[:, 0, :] | c[:, 1, :] << 8 | c[:, 2, :] << 16 | c[:, 3, :] << 24).astype(np.uint32)


def padded(rows: np.ndarray) -> np.ndarray:
    """Rows of 16 codes, padded with zero rows to whole groups of CODEC (quant.pack's unit)."""
    per = CODEC.group_size // CODES
    extra = -len(rows) % per
    return np.concatenate([rows, np.zeros((extra, CODES), rows.dtype)]) if extra else rows


def test_every_code_bit_lands_where_quant_pack_puts_it_and_nothing_else_leaks_in(helpers):
    """Basis inputs: each of a word's 32 bits alone (but bits 6-7 of the code byte, zero in every code
    word the quantizer makes: codes are < 64), in each of the 16 words, and all bits clear."""
    records, codes = [np.zeros(CODES, np.uint32)], [np.zeros(CODES, np.uint8)]
    for i in range(CODES):
        for bit in (b for b in range(32) if b not in (6, 7)):
            word = np.zeros(CODES, np.uint32)
            word[i] = 1 << bit
            code = np.zeros(CODES, np.uint8)
            if bit < 6:
                code[i] = 1 << bit  # a code bit; any other bit is not part of the code and must not show
            records.append(word)
            codes.append(code)
    got = helpers("pack", np.array(records))
    want = reference_planes(padded(np.array(codes)))[:len(records)]
    bad = np.nonzero((got != want).any(axis=1))[0]
    assert not bad.size, f"{bad.size} basis inputs packed wrong, first: input {records[bad[0]]} -> {got[bad[0]]}, " \
                         f"quant.pack {want[bad[0]]}"


def test_random_units_pack_as_quant_pack_does(helpers):
    rng = np.random.default_rng(6)
    codes = rng.integers(0, 64, size=(4096, CODES), dtype=np.uint8)
    codes[:64] = 63  # all bits set
    codes[64:128] = np.arange(64, dtype=np.uint8)[:, None]  # every code in every place
    words = codes.astype(np.uint32) + np.uint32(MAGIC_BITS)  # the quantizer's words (q's bit patterns)
    words[2048:] = codes[2048:] | (rng.integers(0, 1 << 24, size=(2048, CODES), dtype=np.uint32) << 8)
    np.testing.assert_array_equal(helpers("pack", words), reference_planes(codes))


def test_every_plane_bit_lands_in_its_code_and_the_code_words_stay_clean(helpers):
    """Basis inputs of the unpacking: each of the 96 plane bits alone, and all clear; the code words
    must hold each code in a whole byte (bits 6-7 zero: fc_dequantize puts the byte under FC_MAGIC)."""
    planes = [np.zeros(3, np.uint32)]
    for k in range(3):
        for bit in range(32):
            p = np.zeros(3, np.uint32)
            p[k] = 1 << bit
            planes.append(p)
    planes = np.array(planes)
    buf_rows = len(planes) + (-len(planes) % 2)
    lo = np.zeros((buf_rows, LO_WORDS), np.uint32)
    hi = np.zeros((buf_rows, HI_WORDS), np.uint32)
    lo[:len(planes)], hi[:len(planes)] = planes[:, :2], planes[:, 2:]
    lay = quant.plane_layout(buf_rows * CODES, CODEC)
    buf = np.zeros(lay["total"][1], np.uint8)
    buf[lay["lo"][0]:lay["lo"][0] + lay["lo"][1]] = lo.view(np.uint8).reshape(-1)
    buf[lay["hi"][0]:lay["hi"][0] + lay["hi"][1]] = hi.view(np.uint8).reshape(-1)
    codes, _, _ = quant.unpack(buf, buf_rows * CODES, CODEC)
    want = code_words(codes.reshape(-1, CODES)[:len(planes)])
    np.testing.assert_array_equal(helpers("unpack", planes), want)


def test_random_planes_unpack_as_quant_unpack_does(helpers):
    rng = np.random.default_rng(60)
    codes = rng.integers(0, 64, size=(4096, CODES), dtype=np.uint8)
    got = helpers("unpack", reference_planes(codes))
    np.testing.assert_array_equal(got, code_words(codes))
    assert not (got & np.uint32(0xC0C0C0C0)).any()


def symmetric_codes_with_the_offset_in_the_magic(y: np.ndarray) -> np.ndarray:
    """INT6's symmetric code of the scaled value y with the offset in the magic constant: y + (FC_MAGIC + 32)
    rounded to float32, clamped to the magic +- 31 (fminf/fmaxf), the low byte of its bit pattern.  (fc_quantize
    leaves the clamp out: test_the_reference_clip_never_binds_so_the_kernel_leaves_it_out.)"""
    magic = np.float32(12582912.0 + 32)
    q = np.minimum(np.maximum((y + magic).astype(np.float32), magic - np.float32(31)), magic + np.float32(31))
    return (q.view(np.uint32) & 0xFF).astype(np.uint8)


def test_the_magic_with_the_symmetric_offset_rounds_every_scaled_value_as_the_reference():
    """quant.quantize: rint(y) clipped to +-31, plus 32, for every finite float32 y = RN(x * inv).

    Exhaustive near every tie and step that matters (k/2 and 2^e, +- 64 ulps, for |y| up to 2^26), plus
    every exponent with random mantissas; y beyond 2^22 in magnitude only has to clamp alike."""
    f32 = np.float32
    centres = np.concatenate([np.arange(-80, 81) / 2.0] + [s * 2.0 ** np.arange(-149, 128) for s in (-1, 1)])
    centres = centres.astype(f32)
    ulps = np.arange(-64, 65, dtype=np.int64)
    as_int = centres.view(np.int32).astype(np.int64)
    near = (as_int[:, None] + np.sign(np.where(centres == 0, 1, centres))[:, None].astype(np.int64) * ulps)
    near = near[(near > -2 ** 31) & (near < 2 ** 31)].astype(np.int32).view(f32)
    rng = np.random.default_rng(32)
    random = rng.integers(0, 2 ** 32, size=1 << 20, dtype=np.uint64).astype(np.uint32).view(f32)
    y = np.concatenate([near, random, np.array([0.0, -0.0, 3.4028235e38, -3.4028235e38], f32)])
    y = y[np.isfinite(y)]
    want = (np.clip(np.rint(y), -31, 31) + 32).astype(np.uint8)
    got = symmetric_codes_with_the_offset_in_the_magic(y)
    wrong = np.nonzero(got != want)[0]
    assert not wrong.size, f"{wrong.size} values, first y = {y[wrong[0]]!r}: {got[wrong[0]]} != {want[wrong[0]]}"


def groups_at_every_scale(bits: int, symmetric: bool, seed: int) -> np.ndarray:
    """Groups of 32 whose largest magnitude (symmetric) or range (asymmetric) takes every float32 exponent, with
    random mantissas (so the scale and its inverse round both ways), the extremes themselves in the group, and
    groups straddling FLT_MIN * qmax (where the scale turns zero) and FLT_MAX (the largest finite ranges)."""
    rng = np.random.default_rng(seed)
    qmax = Codec(bits, 32, symmetric).qmax
    exps = np.repeat(np.arange(-149, 128), 64)
    top = np.ldexp(1.0 + rng.random(exps.size), exps)
    edges = np.concatenate([np.float32(1.1754944e-38) * qmax * (1 + np.arange(-64, 65) * 2.0 ** -23),
                            np.float32(3.4028235e38) * (1 - rng.random(256) * 2.0 ** -10)])
    top = np.minimum(np.concatenate([top, edges]), 3.4028235e38).astype(np.float32)
    top = top[top > 0]
    unit = rng.uniform(-1, 1, size=(top.size, 32))
    unit[:, 0], unit[:, 1] = 1.0, -1.0  # the extremes
    if symmetric:
        x = unit * top[:, None]
    else:  # range `top`: from lo to lo + top, lo anywhere that keeps both ends finite
        lo = -top * rng.random(top.size)
        x = lo[:, None] + (unit + 1) / 2 * top[:, None]
    x = x.astype(np.float32)
    return x[np.isfinite(x).all(axis=1)].reshape(-1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_reference_clip_never_binds_so_the_kernel_leaves_it_out(symmetric):
    """fc_quantize<6> has no clamp: quant.quantize's clip must never change a code of a finite group (the
    argument is in fc_quant.cuh; scale and 1/scale are normal and within 2^-24 of exact)."""
    codec = Codec(6, 32, symmetric)
    x = groups_at_every_scale(6, symmetric, seed=6 + symmetric)
    codes, scales, mins = quant.quantize(x, codec)
    f32 = np.float32
    xg = x.reshape(-1, 32)
    inv = np.where(scales > 0, f32(1) / np.where(scales > 0, scales, f32(1)), f32(0)).astype(f32)[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        y = (xg * inv if symmetric else (xg - mins[:, None]).astype(f32) * inv).astype(f32)
    unclipped = np.rint(y) + (32 if symmetric else 0)
    good = np.isfinite(scales)
    assert good.mean() > 0.99  # nearly every group is finite: the test looks at real cases
    wrong = np.nonzero((unclipped != codes.reshape(-1, 32)) & good[:, None])
    assert not wrong[0].size, f"{wrong[0].size} codes clipped, first group scale {scales[wrong[0][0]]!r}"
