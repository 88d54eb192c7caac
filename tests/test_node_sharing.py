"""The node's shared-memory segment and the file-descriptor hand-off, run for real under
``mpiexec -n 2/3/4`` (checks in ``tests/mpi_scripts/node_sharing.py``), and the host and
virtual-memory-handle workspaces built on them with CUDA faked (``host_workspace.py``,
``vmm_workspace.py`` there)."""
from __future__ import annotations

import os
import secrets
import socket
import struct
import time

import pytest

from flashcomm_cupy.backends import fdpass, shm
from mpi_util import SCRIPTS, run_mpi

WORLD_SIZES = (2, 3, 4)
TIMEOUT_S = 60


def _prefix():
    return f"fctest{secrets.token_hex(4)}"


def _leftovers(prefix):
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)]


def _run(case, world_size, prefix):
    return run_mpi(SCRIPTS / "node_sharing.py", world_size, args=(case, prefix), timeout=TIMEOUT_S)


def _assert_every_rank_ok(proc, world_size):
    assert proc.returncode == 0, proc.stdout
    for r in range(world_size):
        assert f"OK rank {r}" in proc.stdout, proc.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_segment_is_shared_and_leaves_no_name(world_size):
    prefix = _prefix()
    proc = _run("segment", world_size, prefix)
    _assert_every_rank_ok(proc, world_size)
    assert _leftovers(prefix) == []


@pytest.mark.mpi
@pytest.mark.parametrize("case", ("raise", "kill"))
def test_a_failing_rank_leaves_nothing_in_dev_shm(case):
    prefix = _prefix()
    proc = _run(case, 3, prefix)  # run_mpi removes what MPICH itself leaves behind
    assert proc.returncode != 0, proc.stdout
    assert _leftovers(prefix) == []


@pytest.mark.mpi
def test_too_small_dev_shm_is_one_clear_error_on_every_rank():
    prefix = _prefix()
    proc = _run("too-big", 2, prefix)
    _assert_every_rank_ok(proc, 2)
    assert _leftovers(prefix) == []


@pytest.mark.mpi
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_descriptors_reach_every_rank(world_size):
    _assert_every_rank_ok(_run("fds", world_size, _prefix()), world_size)


@pytest.mark.mpi
def test_descriptor_hand_off_is_bounded():
    proc = _run("fds-timeout", 3, _prefix())
    _assert_every_rank_ok(proc, 3)
    assert "timed out after 2 s" in proc.stdout, proc.stdout


def test_sweep_removes_only_dead_creators_old_names(tmp_path):
    prefix = _prefix()
    dead = 2**22 + 12345  # above the default pid_max: never a live process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    old = time.time() - 2 * shm.LEFTOVER_AGE_S
    names = {"dead_old": f"{prefix}-{dead}-ab12", "dead_young": f"{prefix}-{dead}-cd34",
             "alive_old": f"{prefix}-{os.getpid()}-ef56", "other": f"x{prefix}-{dead}-0a0b"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key != "dead_young":
            os.utime(tmp_path / name, (old, old))
    removed = shm.sweep_leftovers(prefix, str(tmp_path))
    assert removed == [names["dead_old"]]
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if k != "dead_old")


def test_room_error_names_the_size_needed(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert shm.room_error(1, str(tmp_path)) is None
    text = shm.room_error(free + (3 << 30), str(tmp_path))
    assert f"({free + (3 << 30)} bytes)" in text and "--shm-size=" in text


def test_hand_off_from_a_stranger_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.sendmsg([struct.pack("<ii", 1, 0)])
        with pytest.raises(PermissionError, match="not rank 1 of this job"):
            fdpass._receive(b, [os.getpid(), os.getpid() + 1])


@pytest.mark.mpi
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_host_workspace_regions_with_cuda_faked(world_size):
    before = set(os.listdir(shm.SHM_DIR))
    proc = run_mpi(SCRIPTS / "host_workspace.py", world_size, args=("ok",), timeout=TIMEOUT_S)
    _assert_every_rank_ok(proc, world_size)
    assert not [n for n in set(os.listdir(shm.SHM_DIR)) - before if n.startswith(shm.DEFAULT_PREFIX)]


@pytest.mark.mpi
def test_host_workspace_failure_is_agreed_and_undone():
    proc = run_mpi(SCRIPTS / "host_workspace.py", 3, args=("register-fails",), timeout=TIMEOUT_S)
    _assert_every_rank_ok(proc, 3)


@pytest.mark.mpi
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_virtual_memory_workspace_with_cuda_faked(world_size):
    _assert_every_rank_ok(run_mpi(SCRIPTS / "vmm_workspace.py", world_size, args=("ok",), timeout=TIMEOUT_S),
                          world_size)


@pytest.mark.mpi
def test_virtual_memory_workspace_failure_is_agreed_and_undone():
    _assert_every_rank_ok(run_mpi(SCRIPTS / "vmm_workspace.py", 3, args=("import-fails",), timeout=TIMEOUT_S), 3)
