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
