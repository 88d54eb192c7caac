"""The ``flashcomm`` command: a click group whose subcommands load on first use.

Each subcommand lives in its own module and is imported only when it runs
(or its own ``--help`` is asked for), so ``flashcomm --help`` stays instant
and a module that is missing or broken disables only its own command.

:func:`main` is the console-script entry point.  It turns every error into a
one-line message on stderr (rank 0 for flag errors; every rank, prefixed by
its rank, for other failures) and aborts the MPI job when an exception
escapes on one rank, so the other ranks never hang in a collective.
"""
from __future__ import annotations

import importlib
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import click

from flashcomm_cupy import __version__
from flashcomm_cupy.launchers import launched_rank, launched_size

#: name -> (module relative to this package, attribute, one-line help)
LAZY_COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "bench": (".bench", "bench", "Time flashcomm modes against NCCL/MPI over a sweep of sizes."),
    "info": (".info", "info", "Versions, ranks, devices, topology and tuning in use."),
    "verify": (".verify", "verify", "Check every mode bit-exactly against the reference."),
    "accuracy": (".accuracy", "accuracy", "Quantization error vs bytes on the wire, per mode."),
    "model": (".model", "model", "Tensor-parallel transformer forward pass: prefill/decode times."),
    "tune": (".tune", "tune", "Measure the one-shot/two-shot crossover and write a tuning table."),
}
_PACKAGE = __package__ or "flashcomm_cupy.cli"


def _unavailable(name: str, exc: BaseException) -> click.Command:
    """A stand-in command that explains why ``name`` cannot load."""
    reason = f"{type(exc).__name__}: {exc}"

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []},
                   help=f"(unavailable: {reason})", add_help_option=False)
    def stub():
        raise click.ClickException(f"'flashcomm {name}' is unavailable: {reason}")
    return stub


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that command is needed."""

    def __init__(self, *args, lazy_commands: Optional[Dict[str, Tuple[str, str, str]]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.commands or name not in self.lazy_commands:
            return super().get_command(ctx, name)
        module_name, attr, _ = self.lazy_commands[name]
        try:
            command = getattr(importlib.import_module(module_name, _PACKAGE), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module_name}.{attr} is not a click command")
        except Exception as exc:  # a broken module must not break the other commands
            return _unavailable(name, exc)
        self.commands[name] = command
        return command

    def format_commands(self, ctx, formatter):
        """List commands from the table's help lines, importing nothing."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands and name not in self.commands:
                rows.append((name, self.lazy_commands[name][2]))
            else:
                cmd = super().get_command(ctx, name)
                rows.append((name, cmd.get_short_help_str(limit=80) if cmd else ""))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group("flashcomm", cls=LazyGroup, lazy_commands=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="flashcomm")
def cli():
    """flashcomm: low-bit quantized all-reduce (Flash Communication) vs NCCL/MPI.

    Run under mpirun/mpiexec with one rank per GPU (`mpirun -n 8 flashcomm
    bench`), or on its own: it then relaunches itself on every GPU of this
    host, or on the CPU backend (one rank per core, 2 to 4) when there is no GPU.
    """


# ----------------------------------------------------------------------------- errors
def _mpi_world():
    """``MPI.COMM_WORLD`` when this process has initialized MPI (else None); never initializes it."""
    mod = sys.modules.get("mpi4py.MPI")
    if mod is None:
        return None
    try:
        if mod.Is_initialized() and not mod.Is_finalized():
            return mod.COMM_WORLD
    except Exception:
        pass
    return None


def _rank() -> int:
    world = _mpi_world()
    return world.Get_rank() if world is not None else launched_rank()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _report(message: str, every_rank: bool) -> None:
    rank = _rank()
    if rank == 0:
        click.echo(f"flashcomm: error: {message}", err=True)
    elif every_rank:
        click.echo(f"[rank {rank}] flashcomm: error: {message}", err=True)


def _abort_job(code: int) -> None:
    """Abort every rank when MPI runs with more than one rank; otherwise return."""
    world = _mpi_world()
    if world is None and launched_size() > 1:
        # This rank failed before it initialized MPI, while the others may already wait
        # in a collective (or in MPI_Init for this rank): initialize it only to abort.
        try:
            from flashcomm_cupy import _mpi
            world = _mpi.mpi().COMM_WORLD
        except Exception:
            return
    if world is None or world.Get_size() < 2:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if world.Get_rank() != 0:
        time.sleep(0.5)  # let rank 0's message out first; any rank's Abort ends the job
    world.Abort(code)


def _agreed(exc) -> bool:
    """True for a Ctrl-C that every rank took at the same point (harness.interrupts): the ranks
    then exit by themselves, with no MPI_Abort to cut off rank 0's last output."""
    from flashcomm_cupy.harness.interrupts import AgreedInterrupt
    return isinstance(exc, AgreedInterrupt)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``flashcomm`` with ``argv`` (default ``sys.argv[1:]``) and exit with its status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = cli.main(args=args, prog_name="flashcomm", standalone_mode=False,
                          obj={"argv": args})
    except click.UsageError as exc:
        # Flag errors are the same on every rank: say it once, exit 2 everywhere.
        sub = exc.ctx.info_name if exc.ctx is not None and exc.ctx.parent is not None else None
        hint = f" (see 'flashcomm {sub} --help')" if sub else " (see 'flashcomm --help')"
        _report(_one_line(exc.format_message()) + hint, every_rank=False)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _report(_one_line(exc.format_message()), every_rank=False)
        sys.exit(exc.exit_code)
    except click.Abort as exc:  # click's form of a KeyboardInterrupt (the cause)
        agreed = _agreed(exc.__cause__)
        _report("interrupted" if agreed else "aborted", every_rank=False)
        if not agreed:
            _abort_job(130)
        sys.exit(130)
    except KeyboardInterrupt as exc:
        _report("interrupted", every_rank=False)
        if not _agreed(exc):
            _abort_job(130)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        _report(_one_line(f"{type(exc).__name__}: {exc}"), every_rank=True)
        _abort_job(1)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
