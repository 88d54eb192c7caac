"""Experiment only (NOTES v31): the MiniLM study with the rotation over fixed blocks of B elements
(env ROT_BLOCK, default 32: signs over the group, FWHT and normalisation over each block of B) instead
of over the whole group.  Run as `mpiexec -n 2 python benchmarks/blockrot_study.py accuracy --model minilm ...`."""
import os
import sys

import numpy as np

from flashcomm_cupy import hadamard

B = int(os.environ.get("ROT_BLOCK", "32"))
F32 = np.float32


def rotate(x32, g):
    b = min(B, g)
    y = (np.asarray(x32, dtype=F32).reshape(-1, g) * hadamard.signs(g)).astype(F32).reshape(-1, b)
    with np.errstate(invalid="ignore", over="ignore"):
        hadamard._fwht_groups(y)
        return (y * hadamard.norm(b)).astype(F32).reshape(-1)


def unrotate(y32, g):
    b = min(B, g)
    z = np.array(y32, dtype=F32).reshape(-1, b)
    with np.errstate(invalid="ignore", over="ignore"):
        hadamard._fwht_groups(z)
        z = (z * hadamard.norm(b)).astype(F32)
    return (z.reshape(-1, g) * hadamard.signs(g)).astype(F32).reshape(-1)


if __name__ == "__main__":
    if B:
        hadamard.rotate, hadamard.unrotate = rotate, unrotate
    x = np.random.default_rng(0).standard_normal(4096).astype(F32)
    assert np.allclose(hadamard.unrotate(hadamard.rotate(x, 1024), 1024), x, atol=1e-5)
    from flashcomm_cupy.cli.main import main
    sys.exit(main(sys.argv[1:]))
