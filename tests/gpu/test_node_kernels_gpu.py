"""The hierarchical all-reduce's inter-node kernels on one GPU, against the NumPy reference.

    python -m pytest tests/gpu/test_node_kernels_gpu.py

``fc_node_encode`` and ``fc_node_sum`` (``kernels_cu/fc_node.cuh``) without NCCL: every simulated
node's chunk is encoded on this GPU and copied into its slot of the receive buffer, as the
all-gather would leave it; the sum must equal the reference bit for bit (``sum_decoded`` over the
nodes, then ``finish`` where the sum is the result), for 2 and 3 nodes, every dtype and codec,
rotation, symmetric codes, odd sizes, and the float32 shard of several GPUs per node.  A chunk
whose status is not OK (never arrived, or its node failed) must turn the whole output into NaN
and be recorded.
"""
import numpy as np
import pytest

pytestmark = [pytest.mark.gpu]


class _Delivered:
    """An all-gather that delivers ``chunks`` (one per node, in node order) or, where a chunk is
    None, nothing (its slot keeps the "not arrived" mark the encoder wrote)."""

    def __init__(self, chunks):
        self.chunks = chunks

    def all_gather(self, send_ptr, recv_ptr, count, dtype, stream_ptr):
        import cupy
        for k, chunk in enumerate(self.chunks):
            if chunk is not None:
                cupy.cuda.runtime.memcpyAsync(recv_ptr + k * count, chunk.data.ptr, count,
                                              cupy.cuda.runtime.memcpyDeviceToDevice, stream_ptr)


def _device(x):
    import cupy
    from flashcomm_cupy.dtypes import bfloat16
    return cupy.asarray(x.view(np.uint16)).view(cupy.uint16) if x.dtype == bfloat16 else cupy.asarray(x)


def _host(y, dtype):
    out = y.get()
    return out.view(dtype) if out.dtype == np.uint16 else out


def _run(inter, inputs, me, out, deliver=None):
    """Every node's chunk from its input, then the step on node ``me``'s input into ``out``."""
    import cupy
    stream = cupy.cuda.get_current_stream()
    chunks = []
    for x in inputs:
        inter.encode(inter.grid, inter.block, (x, inter.send, inter.recv) + inter.encode_args, stream=stream)
        chunks.append(inter.send.copy())
    if deliver is not None:
        chunks = deliver(chunks)
    inter.run(inputs[me], out, _Delivered(chunks), stream)
    stream.synchronize()


@pytest.fixture
def failure():
    from flashcomm_cupy.backends.hierarchical import NodeFailure
    record = NodeFailure(rank=0)
    yield record
    record.close()


@pytest.mark.parametrize("nodes", [2, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bits, group, rotate, sym", [(None, 128, False, False), (8, 128, False, False),
                                                      (8, 128, True, False), (6, 128, True, False),
                                                      (6, 32, True, False),  # a group one lane holds
                                                      (4, 128, False, True), ((4, 8), 128, True, False)])
@pytest.mark.parametrize("n", [1, 127, 4099, 65_537])
def test_one_gpu_per_node_sum_is_the_reference(failure, nodes, dtype, bits, group, rotate, sym, n):
    from flashcomm_cupy import flash_all_reduce_reference
    from flashcomm_cupy.backends.hierarchical import _OneGpuPerNodePlan
    from flashcomm_cupy.config import Mode
    from flashcomm_cupy.dtypes import DTYPES
    mode = Mode.make(bits, group, sym, rotate, "hierarchical")
    rng = np.random.default_rng([n, nodes])
    host = [(rng.standard_normal(n) * 3).astype(np.float32).astype(DTYPES[dtype]) for _ in range(nodes)]
    inputs = [_device(x) for x in host]
    plan = _OneGpuPerNodePlan(n, dtype, mode, nodes, failure)
    out = inputs[0].copy()
    out.fill(0)
    _run(plan.inter, inputs, 1, out)
    want = flash_all_reduce_reference(host, mode=mode, nodes=1)[0]
    got = _host(out, want.dtype)
    width = np.uint32 if want.dtype == np.float32 else np.uint16
    assert np.array_equal(got.view(width), want.view(width)), f"{dtype} {mode.label} n={n} nodes={nodes}"
    assert failure.record() is None


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_a_node_shard_sum_is_sum_decoded(failure, bits):
    """Several GPUs per node: the float32 shard (rotated already) is summed over the nodes and stays
    float32 and rotated: ``reference.sum_decoded``."""
    import cupy
    from flashcomm_cupy import reference
    from flashcomm_cupy.backends.hierarchical import _InterNodeSum
    from flashcomm_cupy.config import Mode
    mode = Mode.make(bits, 128, False, bits is not None, "hierarchical")  # a rotated mode's shard: not again
    shard = 128 * 37
    rng = np.random.default_rng(bits or 0)
    host = [(rng.standard_normal(shard) * 5).astype(np.float32) for _ in range(3)]
    host[1][5] = np.float32(1e-40)  # a float32 subnormal survives (no flush to zero)
    inter = _InterNodeSum(shard, shard, "float32", mode, 3, rotate=False, failure=failure)
    out = cupy.zeros(shard, dtype=cupy.float32)
    _run(inter, [cupy.asarray(x) for x in host], 2, out)
    want = reference.sum_decoded(host, mode)
    assert np.array_equal(out.get().view(np.uint32), want.view(np.uint32))


def test_a_chunk_that_never_arrived_makes_every_element_nan_and_is_recorded(failure):
    import cupy
    from flashcomm_cupy.backends import hierarchical as h
    from flashcomm_cupy.config import Mode
    n = 4099
    inputs = [cupy.ones(n, dtype=cupy.float16) for _ in range(3)]
    plan = h._OneGpuPerNodePlan(n, "float16", Mode.make(4, 128, False, False, "hierarchical"), 3, failure)
    out = cupy.zeros(n, dtype=cupy.float16)
    _run(plan.inter, inputs, 0, out, deliver=lambda chunks: [chunks[0], None, chunks[2]])
    assert bool(cupy.isnan(out).all())
    rec = failure.record()
    assert rec["state"] == h.NODE_MISSING and rec["node"] == 1
    assert "node 1's data never arrived" in str(h.node_failure_error(rec, 0))


def test_a_failed_node_sends_its_flash_record_and_every_receiver_records_it():
    import ctypes

    import cupy
    from flashcomm_cupy.backends import hierarchical as h
    from flashcomm_cupy.config import Mode
    flash_record = cupy.cuda.runtime.hostAlloc(64, 0x3)
    ctypes.memset(flash_record, 0, 64)
    (ctypes.c_uint32 * 4).from_address(flash_record)[:] = [2, 1, 0, 0]  # POISON: local rank 1 poisoned by 0
    (ctypes.c_uint32 * 8).from_address(flash_record)[7] = 1  # claimed, as fc_record leaves a record it wrote
    sender, receiver = h.NodeFailure(rank=4, flash_record=flash_record), h.NodeFailure(rank=5)
    try:
        n = 1000
        mode = Mode.make(8, 128, False, False, "hierarchical")
        x = cupy.ones(n, dtype=cupy.float32)
        failed_node = h._OneGpuPerNodePlan(n, "float32", mode, 2, sender)
        healthy_node = h._OneGpuPerNodePlan(n, "float32", mode, 2, receiver)
        stream = cupy.cuda.get_current_stream()
        encode = failed_node.inter.encode
        encode(failed_node.inter.grid, failed_node.inter.block,
               (x, failed_node.inter.send, failed_node.inter.recv) + failed_node.inter.encode_args, stream=stream)
        sent = failed_node.inter.send.copy()
        out = cupy.zeros(n, dtype=cupy.float32)
        healthy_node.inter.run(x, out, _Delivered([sent, None]), stream)  # its own chunk: marked not arrived
        stream.synchronize()
        rec = receiver.record()
        assert bool(cupy.isnan(out).all())
        assert (rec["state"], rec["node"], rec["sender"], rec["code"], rec["rank"], rec["peer"]) == \
            (h.NODE_FAILED, 0, 4, 2, 1, 0)
        assert "failed inside node 0: its rank 4 reported" in str(h.node_failure_error(rec, 5))
    finally:
        sender.close()
        receiver.close()
        cupy.cuda.runtime.freeHost(flash_record)


def test_a_failed_sum_poisons_its_node_and_an_aborted_gather_is_never_trusted():
    """Several GPUs per node: a rank whose sum failed gives up on its node's flash backend as a
    failed flash wait does -- its poison word in every node rank's workspace (here a node of one
    rank), its flash record FC_ERR_NODE with abort set -- so the node's all-gather half raises on
    every rank of the node.  And once the host marked the record (it aborted the all-gather),
    chunks that all arrived with OK statuses still give NaN: they may be partly stale."""
    import ctypes

    import cupy
    from flashcomm_cupy import _kernels
    from flashcomm_cupy.backends import hierarchical as h
    from flashcomm_cupy.backends.ipc import POISON_PEERS_OFF
    from flashcomm_cupy.config import Mode
    area = cupy.zeros(256, dtype=cupy.uint8)  # this rank's poison words, then the node's workspace bases
    base = area.data.ptr
    cupy.cuda.runtime.memcpy(base + POISON_PEERS_OFF, np.array([base], np.uint64).ctypes.data, 8,
                             cupy.cuda.runtime.memcpyHostToDevice)
    flash_record = cupy.cuda.runtime.hostAlloc(64, 0x3)
    ctypes.memset(flash_record, 0, 64)
    rank_failure = h.NodeFailure(rank=0, flash_record=flash_record, node_poison=base, node_rank=0, node_world=1)
    try:
        n = 4096
        mode = Mode.make(None, 128, False, False, "hierarchical")  # lossless: 1 + 1 is 2 exactly
        plan = h._OneGpuPerNodePlan(n, "float32", mode, 2, rank_failure)
        inputs = [cupy.ones(n, dtype=cupy.float32), cupy.ones(n, dtype=cupy.float32)]
        out = cupy.zeros(n, dtype=cupy.float32)
        _run(plan.inter, inputs, 0, out)  # every chunk arrives: exact
        assert bool((out == 2).all()) and rank_failure.record() is None
        rank_failure.mark_aborted()  # what the host does before it aborts the all-gather
        _run(plan.inter, inputs, 0, out)
        assert bool(cupy.isnan(out).all())
        words = (ctypes.c_uint32 * len(_kernels.ERROR_FIELDS)).from_address(flash_record)
        record = dict(zip(_kernels.ERROR_FIELDS, words))
        assert (record["code"], record["abort"], record["late"]) == (_kernels.ERR_NODE, 1, _kernels.LATE_OTHER_NODE)
        poison = int(area[:4].view(cupy.uint32).get()[0])
        assert poison == 0x100 | _kernels.LATE_OTHER_NODE  # FC_POISON naming "another node"
    finally:
        rank_failure.close()
        cupy.cuda.runtime.freeHost(flash_record)
