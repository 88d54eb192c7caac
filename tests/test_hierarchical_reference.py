"""Spec of the hierarchical all-reduce in the NumPy reference, and of the node layout.

The reference's ``algo="hierarchical"`` is checked against a hand-written
version built from quant.encode/decode alone, against its documented
degenerate cases (one node = two-shot, one rank per node = one-shot), and
against the exact sum.
"""
import itertools

import numpy as np
import pytest

from flashcomm_cupy import hadamard, quant
from flashcomm_cupy.config import Mode
from flashcomm_cupy.dtypes import DTYPES, from_f32, to_f32
from flashcomm_cupy.reference import SegmentLayout, exact_sum, flash_all_reduce_reference as far
from flashcomm_cupy.topology import NodeLayout, check_ranks_per_node

F32 = np.float32
BITS = (None, 4, 6, 8, (4, 8), (8, 4))


def ranks_data(n, length, dtype_name, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n):
        x = rng.standard_normal(length) * (1 + r)
        x[::53] *= 40.0
        out.append(x.astype(DTYPES[dtype_name]))
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def hand_written(inputs, nodes, mode):
    """The algorithm of reference.py's docstring, written out with quant.encode/decode only."""
    dt = inputs[0].dtype
    p_count, length, g = len(nodes[0]), inputs[0].size, mode.group_size
    seg = -(-max(1, -(-length // g)) // p_count) * g          # elements per segment
    padded = []
    for x in inputs:
        v = np.zeros(seg * p_count, F32)
        v[:length] = to_f32(x)
        padded.append(hadamard.rotate(v, g) if mode.rotate else v)

    def wire(v, codec):
        return v if mode.lossless else quant.decode(quant.encode(v, codec), v.size, codec)

    full = np.zeros(seg * p_count, F32)
    for p in range(p_count):
        sl = slice(p * seg, (p + 1) * seg)
        partials = []
        for node in nodes:
            acc = np.zeros(seg, F32)
            for local, r in enumerate(node):
                part = padded[r][sl] if local == p else wire(padded[r][sl], mode.rs_codec)
                acc = (acc + part).astype(F32)
            partials.append(acc)
        if len(nodes) > 1:
            total = np.zeros(seg, F32)
            for part in partials:
                total = (total + wire(part, mode.rs_codec)).astype(F32)
        else:
            total = partials[0]
        if p_count > 1:
            total = to_f32(from_f32(total, dt)) if mode.lossless else wire(total, mode.ag_codec)
        full[sl] = total
    if mode.rotate:
        full = hadamard.unrotate(full, g)
    return from_f32(full[:length], dt)


@pytest.mark.parametrize("shape", [(2, 2), (3, 1), (2, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bits", BITS)
def test_matches_the_hand_written_algorithm(shape, dtype_name, bits):
    m, p = shape
    for length, rotate, sym in ((1, False, False), (1000, bits is not None, False), (4099, False, bits is not None)):
        mode = Mode.make(bits, 128, sym, rotate, "hierarchical")
        inputs = ranks_data(m * p, length, dtype_name, seed=length)
        outs = far(inputs, mode=mode, nodes=p)
        want = hand_written(inputs, [list(range(k * p, (k + 1) * p)) for k in range(m)], mode)
        assert all(same_bits(o, outs[0]) for o in outs)
        assert same_bits(outs[0], want), (shape, dtype_name, bits, length)


def test_nodes_follow_the_layout_not_rank_blocks():
    """Round-robin placement (ranks 0,2 on node 0; 1,3 on node 1): owners and sums follow the layout."""
    inputs = ranks_data(4, 777, "float16", seed=5)
    layout = NodeLayout.from_node_keys(["a", "b", "a", "b"])
    assert layout.nodes == ((0, 2), (1, 3))
    for bits in (None, 4, (4, 8)):
        mode = Mode.make(bits, 64, algo="hierarchical")
        got = far(inputs, mode=mode, nodes=layout)[0]
        assert same_bits(got, hand_written(inputs, [[0, 2], [1, 3]], mode))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_one_node_is_twoshot_and_one_rank_per_node_is_oneshot(bits, n):
    """No peer, no step: the degenerate layouts reproduce the flat algorithms bit for bit.

    (On one rank the flat algorithms still round-trip through a codec; the
    hierarchical one has no step left: see test_one_rank_returns_its_input.)
    """
    for dtype_name, length in (("bfloat16", 999), ("float32", 4097)):
        inputs = ranks_data(n, length, dtype_name, seed=n)
        hier = dict(bits=bits, group_size=64, algo="hierarchical")
        assert same_bits(far(inputs, nodes=n, **hier)[0], far(inputs, bits=bits, group_size=64, algo="twoshot")[0])
        assert same_bits(far(inputs, nodes=1, **hier)[0], far(inputs, bits=bits, group_size=64, algo="oneshot")[0])


@pytest.mark.parametrize("bits", BITS)
def test_one_rank_returns_its_input(bits):
    x = ranks_data(1, 1001, "bfloat16")
    assert same_bits(far(x, bits=bits, algo="hierarchical")[0], x[0])


def test_lossless_is_the_node_order_sum_of_node_sums():
    inputs = ranks_data(6, 3001, "float32", seed=9)
    got = far(inputs, bits=None, algo="hierarchical", nodes=3)[0]
    node_sums = [((inputs[3 * k] + inputs[3 * k + 1]).astype(F32) + inputs[3 * k + 2]).astype(F32) for k in range(2)]
    want = (node_sums[0] + node_sums[1]).astype(F32)
    assert same_bits(got, want)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_quantized_error_is_within_half_again_of_twoshot(bits):
    """Three quantized steps instead of two: measured 1.2-1.3x two-shot's error on 2x2 (outlier data)."""
    inputs = ranks_data(4, 8192, "float32", seed=2)
    truth = exact_sum(inputs)

    def rel(algo, nodes=None):
        got = far(inputs, bits=bits, algo=algo, nodes=nodes)[0].astype(np.float64)
        return np.sqrt(np.mean((got - truth) ** 2) / np.mean(truth ** 2))

    assert 0 < rel("hierarchical", 2) < 1.5 * rel("twoshot")


def test_nan_poisons_only_its_group():
    inputs = ranks_data(4, 1024, "float32", seed=3)
    inputs[3][300] = np.nan
    got = far(inputs, bits=4, group_size=128, algo="hierarchical", nodes=2)[0]
    assert np.isnan(got[256:384]).all()
    assert np.isfinite(np.delete(got, np.s_[256:384])).all()


def test_segment_layout_has_one_owner_per_local_rank():
    """Documented layout: SegmentLayout(L, P, g), shared by the CPU backend and the GPU kernels."""
    layout = SegmentLayout(1000, 2, 128)
    assert (layout.segment_elems, layout.padded_length) == (512, 1024)


# --------------------------------------------------------------------------- node layout
def test_node_layout_basics():
    layout = NodeLayout.blocks(6, 3)
    assert layout.nodes == ((0, 1, 2), (3, 4, 5))
    assert (layout.num_nodes, layout.ranks_per_node, layout.spans_nodes) == (2, 3, True)
    assert (layout.node_of(4), layout.local_rank(4)) == (1, 1)
    assert layout.label() == "2 nodes x 3 ranks"
    assert NodeLayout.single(2).label() == "1 node x 2 ranks"
    assert not NodeLayout.single(2).spans_nodes
    assert NodeLayout.from_node_keys(["h1", "h0", "h1"]).nodes == ((0, 2), (1,))


def test_uneven_nodes_are_refused_by_hierarchical():
    layout = NodeLayout.from_node_keys(["a", "a", "b"])
    assert not layout.uniform and layout.label() == "2 nodes (2, 1 ranks)"
    with pytest.raises(ValueError, match="same number of ranks on every node"):
        far(ranks_data(3, 10, "float32"), algo="hierarchical", nodes=layout)


@pytest.mark.parametrize("value", [0, -1, 3, "x", 2.5])
def test_ranks_per_node_must_divide_the_world(value):
    with pytest.raises(ValueError, match="ranks_per_node"):
        check_ranks_per_node(value, 4)
    with pytest.raises(ValueError):
        far(ranks_data(4, 10, "float32"), algo="hierarchical", nodes=value)


def test_layout_must_cover_every_rank_once():
    with pytest.raises(ValueError, match="once each"):
        NodeLayout(((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="canonical"):
        NodeLayout(((1, 3), (0, 2)))
    with pytest.raises(ValueError, match="3 ranks, 4 inputs"):
        far(ranks_data(4, 10, "float32"), algo="hierarchical", nodes=NodeLayout.blocks(3, 1))


def test_every_combination_is_deterministic():
    """Two calls on equal inputs give equal bits (no hidden state)."""
    for bits, sym in itertools.product((4, 6), (False, True)):
        inputs = ranks_data(4, 515, "float16", seed=bits)
        a = far(inputs, bits=bits, symmetric=sym, algo="hierarchical", nodes=2)[0]
        b = far([x.copy() for x in inputs], bits=bits, symmetric=sym, algo="hierarchical", nodes=2)[0]
        assert same_bits(a, b)
