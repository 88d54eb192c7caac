"""What the GPU hierarchical backend decides before it touches a GPU (runs on CPU-only machines)."""
import pytest

from flashcomm_cupy.backends.hierarchical import HierarchicalGpuBackend
from flashcomm_cupy.topology import NodeLayout


@pytest.mark.parametrize("world,per_node", [(4, 2), (8, 4)])
def test_several_gpus_per_node_name_the_missing_kernels(world, per_node):
    with pytest.raises(NotImplementedError) as info:
        HierarchicalGpuBackend(comm=None, nodes=NodeLayout.blocks(world, per_node))
    text = str(info.value)
    assert "\n" not in text
    assert f"{per_node} GPUs per node" in text and "reduce-scatter-only and all-gather-only" in text


def test_unknown_options_are_refused_first():
    with pytest.raises(TypeError, match="slot_bytes"):
        HierarchicalGpuBackend(comm=None, nodes=NodeLayout.blocks(2, 1), slot_bytes=3, timeout_s=3)


# --------------------------------------------------------------------------- the helper kernels, on the host
_HOST_PRELUDE = r"""
#include <string.h>
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
#define __fadd_rn(a, b) ((float)((a) + (b)))
#define __fsub_rn(a, b) ((float)((a) - (b)))
#define __fmul_rn(a, b) ((float)((a) * (b)))
"""


@pytest.fixture(scope="module")
def host_helpers(tmp_path_factory):
    """The elementwise kernels' bodies compiled as host C loops (cc, no FMA contraction), via ctypes."""
    import ctypes
    import shutil
    import subprocess

    from flashcomm_cupy.backends import hierarchical as h
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to run the helper kernels on the host")
    loops = {
        "widen": ("const unsigned short* us, float* ys", "unsigned short u = us[i]; float y;",
                  h.WIDEN_BF16_OP, "ys[i] = y;"),
        "narrow": ("const float* xs, unsigned short* ys", "float x = xs[i]; unsigned short y;",
                   h.NARROW_BF16_OP, "ys[i] = y;"),
        "butterfly": ("float* y, int g, int h", "", h.BUTTERFLY_OP, ""),
        "scale_signs": ("float* y, const float* s, float norm, int g", "", h.SCALE_SIGNS_OP, ""),
    }
    src = _HOST_PRELUDE + "".join(
        f"void {name}({params}, long long n) {{ for (long long i = 0; i < n; ++i) {{ {pre}\n{op}\n{post} }} }}\n"
        for name, (params, pre, op, post) in loops.items())
    d = tmp_path_factory.mktemp("helpers")
    (d / "helpers.c").write_text(src)
    subprocess.run([cc, "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(d / "helpers.so"),
                    str(d / "helpers.c")], check=True, capture_output=True, timeout=120)
    return ctypes.CDLL(str(d / "helpers.so"))


def _ptr(a):
    import ctypes
    return a.ctypes.data_as(ctypes.c_void_p)


def test_bf16_helpers_match_ml_dtypes(host_helpers):
    import ctypes

    import numpy as np

    from flashcomm_cupy.dtypes import bfloat16
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-40, 39, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-45, 65504.0,
                                  1.00390625, -1.00390625, 1.01171875], np.float32)]).astype(np.float32)  # ties
    got = np.empty(x.size, np.uint16)
    host_helpers.narrow(_ptr(x), _ptr(got), ctypes.c_longlong(x.size))
    want = x.astype(bfloat16).view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(got[finite], want[finite])
    assert np.isnan(got[~finite].view(bfloat16).astype(np.float32)).all()
    back = np.empty(x.size, np.float32)
    host_helpers.widen(_ptr(got), _ptr(back), ctypes.c_longlong(x.size))
    assert np.array_equal(back[finite].view(np.uint32), got[finite].view(bfloat16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("g", [32, 128, 1024])
def test_unrotate_helpers_match_hadamard(host_helpers, g):
    import ctypes

    import numpy as np

    from flashcomm_cupy import hadamard
    y = (np.random.default_rng(g).standard_normal(g * 5) * 7).astype(np.float32)
    want = hadamard.unrotate(y, g)
    got = y.copy()
    h = 1
    while h < g:
        host_helpers.butterfly(_ptr(got), ctypes.c_int(g), ctypes.c_int(h), ctypes.c_longlong(got.size // 2))
        h *= 2
    signs = hadamard.signs(g)
    host_helpers.scale_signs(_ptr(got), _ptr(signs), ctypes.c_float(hadamard.norm(g)), ctypes.c_int(g),
                             ctypes.c_longlong(got.size))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_several_gpus_per_node_across_nodes_fall_back_to_nccl_with_one_warning(monkeypatch):
    """A multi-node job with several GPUs per node gets NCCL and a warning naming why, not an error
    (the RS-only/AG-only kernels the hierarchical path needs there do not exist yet)."""
    import types
    from flashcomm_cupy.backends import hierarchical, nccl

    class StubNccl(nccl.NcclBackend):  # the real option filter (fallback), no NCCL
        def __init__(self, comm, **options):
            self.options = options

    monkeypatch.setattr(hierarchical._mpi, "node_layout", lambda comm, per_node=None: NodeLayout.blocks(4, 2))
    monkeypatch.setattr(nccl, "NcclBackend", StubNccl)
    comm = types.SimpleNamespace(Get_rank=lambda: 0)
    with pytest.warns(RuntimeWarning, match="2 nodes x 2 ranks.*falling back to NCCL"):
        backend = hierarchical.make_cuda_backend(comm, timeout_s=5, max_blocks=8, protocol="ll")
    assert isinstance(backend, StubNccl) and backend.options == {"timeout_s": 5, "max_blocks": 8}
