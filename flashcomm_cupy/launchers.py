"""What each process launcher tells its processes through the environment: the one table.

Read before MPI is initialized (the relaunch decision, the rank that prints an error, the GPU a
rank picks), so this module never imports mpi4py.  Standard library only.

Rows are tried in order and the first variable that holds a number wins: the MPI launchers
first (their variables are the job's truth when several launchers nest, e.g. ``srun`` starting
an MPI job), then Slurm, PALS and torchrun.  ``mpi`` rows are MPI launchers: a process they
started is part of an MPI job (:func:`under_mpi_launcher`), and its size is the job's
(:func:`launched_size`).  torchrun's ``RANK`` and ``WORLD_SIZE`` are common words that a shell
may hold for other reasons, so they count only with its rendezvous variables
(:func:`launched_by_torchrun`); its ``LOCAL_RANK`` counts alone, as it always did for the GPU a
rank picks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple


@dataclass(frozen=True)
class Launcher:
    """The variables one launcher sets in each process it starts (None: it sets none for that)."""

    name: str
    rank: Optional[str]
    size: Optional[str]
    local_rank: Optional[str]
    local_size: Optional[str]
    mpi: bool

    @property
    def variables(self) -> Tuple[str, ...]:
        return tuple(v for v in (self.rank, self.size, self.local_rank, self.local_size) if v)


LAUNCHERS: Tuple[Launcher, ...] = (
    Launcher("Open MPI (mpirun, prterun)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
             "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", mpi=True),
    Launcher("MPICH / Intel MPI (Hydra mpiexec)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
             mpi=True),
    Launcher("Cray PMI", "PMI_RANK", "PMI_SIZE", "PMI_LOCAL_RANK", "PMI_LOCAL_SIZE", mpi=True),
    Launcher("PMIx (srun --mpi=pmix, prte)", "PMIX_RANK", None, None, None, mpi=True),
    Launcher("Slurm (srun)", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None, mpi=False),
    Launcher("PALS (Cray mpiexec)", "PALS_RANKID", None, "PALS_LOCAL_RANKID", None, mpi=False),
    Launcher("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", mpi=False),
)


def _first(field: str, env: Mapping[str, str], mpi_only: bool = False) -> Optional[int]:
    seen = set()
    for launcher in LAUNCHERS:
        var = getattr(launcher, field)
        if var is None or var in seen or (mpi_only and not launcher.mpi):
            continue
        if launcher.name == "torchrun" and field in ("rank", "size") and not launched_by_torchrun(env):
            continue
        seen.add(var)
        text = env.get(var, "").strip()
        if text.isdigit():
            return int(text)
    return None


def under_mpi_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """True when an MPI launcher (``mpi`` rows) started this process."""
    return any(var in env for launcher in LAUNCHERS if launcher.mpi for var in launcher.variables)


def launched_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's rank as its launcher announced it (0 when none did)."""
    rank = _first("rank", env)
    return 0 if rank is None else rank


def launched_size(env: Mapping[str, str] = os.environ) -> int:
    """The MPI job's size as its launcher announced it (1 when no MPI launcher did)."""
    size = _first("size", env, mpi_only=True)
    return 1 if size is None else size


def torchrun_size(env: Mapping[str, str] = os.environ) -> int:
    """The size torchrun announced to this process (1 when torchrun did not start it)."""
    if not launched_by_torchrun(env):
        return 1
    text = env.get(next(launcher.size for launcher in LAUNCHERS if launcher.name == "torchrun"), "").strip()
    return int(text) if text.isdigit() else 1


def launched_local_rank(env: Mapping[str, str] = os.environ) -> Optional[int]:
    """This process's rank among those of its host, as its launcher announced it; None when none did."""
    return _first("local_rank", env)


def launched_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    """True in a process started by ``torchrun`` / torch elastic (it sets the rendezvous variables)."""
    return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env)


def markdown_table() -> str:
    """The table as markdown, for docs/architecture.md."""
    lines = ["| launcher | rank | size | local rank | local size |", "|---|---|---|---|---|"]
    for launcher in LAUNCHERS:
        cells = [f"`{v}`" if v else "-" for v in (launcher.rank, launcher.size, launcher.local_rank,
                                                  launcher.local_size)]
        lines.append(f"| {launcher.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
