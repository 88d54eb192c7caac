"""The CPU backend's hierarchical all-reduce and node discovery, under ``mpiexec``.

One host pretends to be several nodes through the testing override
(``ranks_per_node=`` or ``$FLASHCOMM_RANKS_PER_NODE``); without it, MPI's
shared-memory split finds one node.  The bit-for-bit checks live in
``tests/mpi_scripts/cpu_hierarchical.py``.
"""
from __future__ import annotations

import re

import pytest

from mpi_util import SCRIPTS, run_mpi, run_mpi_code

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("world_size,ranks_per_node,label,quick", [
    (4, 2, "2 nodes x 2 ranks", False),
    (3, 1, "3 nodes x 1 rank", False),
    (2, 1, "2 nodes x 1 rank", False),
    (6, 2, "3 nodes x 2 ranks", True),   # three nodes: the inter-node sum order matters (a+b == b+a)
    (4, None, "1 node x 4 ranks", True),  # discovery: one host is one node, auto stays two-shot
])
def test_hierarchical_matches_the_reference_bit_for_bit(world_size, ranks_per_node, label, quick):
    args = ([] if ranks_per_node is None else ["--ranks-per-node", ranks_per_node]) + (["--quick"] if quick else [])
    proc = run_mpi(SCRIPTS / "cpu_hierarchical.py", world_size, args)
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout
    summary = re.search(r"nodes=(.+): (\d+) cases, (\d+) failures", proc.stdout)
    assert summary and summary.group(1) == label, proc.stdout
    assert int(summary.group(2)) >= (80 if quick else 200) and int(summary.group(3)) == 0


_BAD_OVERRIDES = r'''
import os
from mpi4py import MPI
import flashcomm_cupy as fc
rank = MPI.COMM_WORLD.Get_rank()

def error_of(**options):
    try:
        fc.Communicator(backend="cpu", **options).close()
    except ValueError as exc:
        return str(exc)
    return "no error"

errors = {
    "indivisible": error_of(ranks_per_node=3),
    "zero": error_of(ranks_per_node=0),
    "differ": error_of(ranks_per_node=2 if rank == 0 else 4),
    "half set": error_of(ranks_per_node=2 if rank == 0 else None),
}
os.environ["FLASHCOMM_RANKS_PER_NODE"] = "two"
errors["env text"] = error_of()
os.environ["FLASHCOMM_RANKS_PER_NODE"] = "1"
comm = fc.Communicator(backend="cpu")
errors["env layout"] = comm.describe()["nodes"]
comm.close()
os.environ["FLASHCOMM_RANKS_PER_NODE"] = "4"
comm = fc.Communicator(backend="cpu", ranks_per_node=2)  # the option wins over the environment
errors["option wins"] = comm.describe()["nodes"]
comm.close()
everyone = MPI.COMM_WORLD.gather(errors, root=0)  # one printer: ranks' lines would interleave
if rank == 0:
    for r, errs in enumerate(everyone):
        for key, text in sorted(errs.items()):
            print(f"rank {r} {key}: {text}", flush=True)
'''


def test_bad_overrides_fail_on_every_rank_with_one_line():
    proc = run_mpi_code(_BAD_OVERRIDES, 4)
    assert proc.returncode == 0, proc.stdout
    for rank in range(4):
        lines = dict(re.findall(rf"^rank {rank} ([a-z ]+): (.*)$", proc.stdout, re.M))
        assert "ranks_per_node=3 must be a positive divisor of the world size 4" in lines["indivisible"]
        assert "ranks_per_node=0 must be a positive divisor" in lines["zero"]
        assert "node layout overrides" in lines["differ"] and "differ between ranks" in lines["differ"]
        assert "rank 0='2'" in lines["half set"] and "rank 1=None" in lines["half set"]
        assert "$FLASHCOMM_RANKS_PER_NODE must be a positive integer, got 'two'" in lines["env text"]
        assert lines["env layout"] == "4 nodes x 1 rank"
        assert lines["option wins"] == "2 nodes x 2 ranks"


def test_verify_and_info_across_two_simulated_nodes(tmp_path):
    """The CLI on 2 nodes x 2 ranks: verify checks hierarchical rows against the reference; info shows nodes."""
    import json
    import sys

    from mpi_util import _is_open_mpi, mpi_env, require_mpi, run_in_group
    mpiexec = require_mpi()
    env = mpi_env({"FLASHCOMM_RANKS_PER_NODE": "2"})
    launch = ([mpiexec] + (["--oversubscribe"] if _is_open_mpi(mpiexec) else [])
              + ["-n", "4", sys.executable, "-m", "flashcomm_cupy.cli.main"])
    path = tmp_path / "v.json"
    proc = run_in_group(launch + ["verify", "--backend", "cpu", "--lengths", "1,4099", "-d", "bfloat16",
                                  "--bits", "none,4,4/8", "--algo", "auto,hierarchical", "--json", str(path)],
                        120, env, merge_stderr=True)
    assert proc.returncode == 0, proc.stdout
    rows = [r for r in json.loads(path.read_text())["rows"] if not r["baseline"]]
    assert rows and all(r["algo_resolved"] == "hierarchical" and r["wrong"] == 0 for r in rows), rows
    proc = run_in_group(launch + ["info", "--backend", "cpu"], 120, env, merge_stderr=True)
    assert proc.returncode == 0 and "2 nodes x 2 ranks" in proc.stdout, proc.stdout


_UNEVEN_NODES = r'''
from mpi4py import MPI
import numpy as np
import flashcomm_cupy as fc
from flashcomm_cupy import _mpi
from flashcomm_cupy.topology import NodeLayout

_mpi.node_layout = lambda comm, ranks_per_node=None: NodeLayout.from_node_keys(["a", "a", "b"])
comm = fc.Communicator(backend="cpu")
lines = [f"nodes: {comm.describe()['nodes']}", f"auto: {comm.resolve_algo(1 << 20)}"]
try:
    comm.all_reduce(np.ones(10, np.float32), algo="hierarchical")
    lines.append("hierarchical: no error")
except ValueError as exc:
    lines.append(f"hierarchical: {exc}")
comm.close()
if MPI.COMM_WORLD.Get_rank() == 0:
    print("\n".join(lines), flush=True)
'''


def test_uneven_nodes_keep_auto_flat_and_refuse_hierarchical():
    """Discovery may find nodes of different sizes (2 + 1 ranks): auto stays two-shot."""
    proc = run_mpi_code(_UNEVEN_NODES, 3)
    assert proc.returncode == 0, proc.stdout
    assert "nodes: 2 nodes (2, 1 ranks)" in proc.stdout and "auto: twoshot" in proc.stdout, proc.stdout
    assert ("hierarchical: the hierarchical all-reduce needs the same number of ranks on every node "
            "(node 0: 2, node 1: 1)") in proc.stdout, proc.stdout
