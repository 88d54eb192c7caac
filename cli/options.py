"""Options and plumbing shared by the ``flashcomm`` commands.

* :func:`mpi_launch` -- ``--np`` / ``--no-relaunch`` and the relaunch under
  mpiexec when a command is started without an MPI launcher.
* :func:`open_communicator` -- the backend, with one-line errors for a
  missing CuPy, no GPU, or more ranks than GPUs.
* the options every command spells the same way (:func:`bits_option`,
  :func:`group_size_option`, :func:`algo_option`, :func:`dtype_option`,
  :func:`switch_option`, :func:`backend_option`, :func:`json_option`), their
  parsers (raising :class:`click.BadParameter`), and :class:`Command`, which
  accepts the old spellings in :data:`FLAG_ALIASES`.
* :func:`check_outputs` -- every output path (and ``--plot``'s matplotlib)
  checked before anything is measured, with one verdict for all ranks.
* :func:`interactive_terminal`, :func:`output_width`, :func:`make_console` --
  where output goes: progress and colour only on a terminal a person watches,
  tables sized to the width, rank 0 only.

Error contract with :func:`flashcomm_cupy.cli.main.main`: raise
:class:`click.ClickException` (or a subclass) only for conditions every rank
sees identically (flags, the machine, versions); they are printed once, by
rank 0.  Anything else is treated as possibly rank-local: printed by every
rank and the MPI job is aborted.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
import shlex
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import click

from flashcomm_cupy import settings
from flashcomm_cupy.backends import registry
from flashcomm_cupy.backends.registry import CUPY_HINT
from flashcomm_cupy.config import FLASH_ALGOS, SUPPORTED_GROUP_SIZES, parse_bits
from flashcomm_cupy.dtypes import resolve_dtype
from flashcomm_cupy.harness import launch
from flashcomm_cupy.harness.sizes import format_size, parse_size

#: what ``--backend`` accepts: every name of the backend registry
BACKEND_CHOICES = registry.NAMES
#: the module a relaunch runs: this command line's own ``main`` (installed or not)
MAIN_MODULE = (__package__ or "flashcomm_cupy.cli") + ".main"
DTYPE_NAMES = ("float16", "bfloat16", "float32")
SWITCH_VALUES = {"off": (False,), "on": (True,), "both": (False, True),
                 "0": (False,), "1": (True,)}


# ----------------------------------------------------------------------------- argv
def original_args() -> List[str]:
    """The arguments this command was started with (after the program name)."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    if root is not None and isinstance(root.obj, dict) and "argv" in root.obj:
        return list(root.obj["argv"])
    return list(sys.argv[1:])


def command_line() -> str:
    """The command as typed, for result files."""
    return " ".join(shlex.quote(a) for a in ["flashcomm", *original_args()])


# ----------------------------------------------------------------------------- parsers
def split_list(value) -> List[str]:
    """A repeatable option that also takes comma lists: ``("8,4", "4/8")`` -> ``["8", "4", "4/8"]``."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def parse_bits_list(ctx, param, value) -> List[Tuple]:
    """``none,8,4,4/8`` -> [(None, None), (8, 8), (4, 4), (4, 8)]."""
    out = []
    for item in split_list(value):
        try:
            pair = parse_bits(item)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        if pair not in out:
            out.append(pair)
    if not out:
        raise click.BadParameter("give at least one of none, 4, 6, 8 or RS/AG such as 4/8")
    return out


def algo_list_parser(allowed: Sequence[str]):
    """A click callback parsing a comma list of algorithms from ``allowed``."""
    def parse(ctx, param, value) -> List[str]:
        out = []
        for item in split_list(value):
            item = item.lower()
            if item not in allowed:
                raise click.BadParameter(f"{item!r} is not one of {', '.join(allowed)}")
            if item not in out:
                out.append(item)
        if not out:
            raise click.BadParameter(f"give at least one of {', '.join(allowed)}")
        return out
    return parse


def parse_switch(ctx, param, value) -> Tuple[bool, ...]:
    """``off`` / ``on`` / ``both`` (also 0/1) -> the tuple of settings to sweep."""
    key = str(value).strip().lower()
    if key not in SWITCH_VALUES:
        raise click.BadParameter(f"{value!r} is not one of off, on, both")
    return SWITCH_VALUES[key]


def parse_dtype(ctx, param, value):
    if value is None:
        return None
    try:
        return resolve_dtype(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def parse_dtype_list(ctx, param, value):
    out = []
    for item in split_list(value):
        dt = parse_dtype(ctx, param, item)
        if dt not in out:
            out.append(dt)
    return out


def parse_size_option(ctx, param, value) -> Optional[int]:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _size_range_check(ctx, smallest: Optional[int], largest: Optional[int]) -> None:
    if smallest is not None and largest is not None and largest < smallest:
        raise click.UsageError(f"--maxbytes {format_size(largest)} is below --minbytes {format_size(smallest)}",
                               ctx)


def parse_min_size_option(ctx, param, value) -> Optional[int]:
    """``-b/--minbytes``: a size, and not above ``-e/--maxbytes`` where that is known already.
    With :func:`parse_max_size_option`, whichever of the two click parses second (the command
    line's order, defaults last) compares them: refused before anything is launched."""
    size = parse_size_option(ctx, param, value)
    _size_range_check(ctx, size, ctx.params.get("maxbytes"))
    return size


def parse_max_size_option(ctx, param, value) -> Optional[int]:
    """``-e/--maxbytes``: a size, and not below ``-b/--minbytes`` (see :func:`parse_min_size_option`)."""
    size = parse_size_option(ctx, param, value)
    _size_range_check(ctx, ctx.params.get("minbytes"), size)
    return size


def parse_count_list(ctx, param, value) -> List[int]:
    return [parse_size_option(ctx, param, item) for item in split_list(value)]


# ----------------------------------------------------------------------------- shared options
# Every command spells these options the same way, with the same choices and parsers.  List
# options take comma lists and may repeat (``--bits 8,4 --bits 4/8``); old spellings stay as
# aliases (extra names below, or :data:`FLAG_ALIASES`).
CONTEXT = {"help_option_names": ["-h", "--help"]}


def switch_option(name: str, help_text: str, default: str = "off"):
    """``--rotate`` (= on), ``--rotate both``, ``--rotate off`` style option."""
    return click.option(name, default=default, is_flag=False, flag_value="on", show_default=True,
                        metavar="[off|on|both]", callback=parse_switch, help=help_text)


def backend_option(extra: Sequence[str] = (), default: str = "auto", help_extra: str = ""):
    """``--backend`` with the registry's names (plus a command's ``extra`` choices)."""
    described = "; ".join(f"{spec.name}: {spec.summary}" for spec in registry.BACKENDS.values())
    return click.option(
        "--backend", type=click.Choice(BACKEND_CHOICES + tuple(extra)), default=default, show_default=True,
        help=f"auto: gpu when CuPy sees a GPU, else cpu; {described}." + help_extra)


def _set_transport(ctx, param, value):
    if value is not None:  # every rank parses the same command line, so every rank sets the same
        settings.override(settings.TRANSPORT, value)
    return value


transport_option = click.option(
    "--transport", type=click.Choice(settings.TRANSPORTS), default=None, expose_value=False,
    callback=_set_transport, is_eager=True,
    help="Where the flash kernels' workspaces live: ipc (GPU memory over NVLink/PCIe P2P), host (shared host "
         "memory, for GPUs without peer access; the NCCL baseline then runs with NCCL_P2P_DISABLE=1), or auto "
         "(IPC where every pair has a peer path, else host). [default: $FLASHCOMM_TRANSPORT or auto]")


def bits_option(default: str, help_text: str = "flashcomm modes: none (lossless), 4, 6, 8, or RS/AG "
                                               "such as 4/8 (comma list, repeatable)."):
    """``--bits`` -> list of ``(rs_bits, ag_bits)`` pairs."""
    return click.option("--bits", multiple=True, default=(default,), show_default=bool(default),
                        callback=parse_bits_list, metavar="BITS", help=help_text)


def _parse_group_sizes(ctx, param, value) -> List[int]:
    out = []
    for item in split_list(value):
        if not item.isdigit() or int(item) not in SUPPORTED_GROUP_SIZES:
            raise click.BadParameter(f"{item!r} is not one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
        if int(item) not in out:
            out.append(int(item))
    if not out:
        raise click.BadParameter(f"give one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    return out


def group_size_option(default: str = "128", multiple: bool = False):
    """``--group-size``: one size (an int), or with ``multiple`` a comma list (list of ints)."""
    def parse(ctx, param, value):
        sizes = _parse_group_sizes(ctx, param, value)
        if not multiple and len(sizes) > 1:
            raise click.BadParameter("give one group size")
        return sizes if multiple else sizes[0]
    choices = "|".join(map(str, SUPPORTED_GROUP_SIZES))
    return click.option("--group-size", multiple=multiple, default=(default,) if multiple else default,
                        show_default=bool(default), callback=parse, metavar=f"[{choices}]",
                        help="Elements per quantization group" + (" (comma list, repeatable)." if multiple else "."))


#: what ``--algo`` accepts: the flash algorithms (config's one list)
ALGO_CHOICES = FLASH_ALGOS


def algo_option(default: str = "auto"):
    """``--algo`` -> list of algorithms from :data:`ALGO_CHOICES`."""
    return click.option("--algo", multiple=True, default=(default,), show_default=bool(default),
                        callback=algo_list_parser(ALGO_CHOICES), metavar="ALGO",
                        help=f"Algorithms: {', '.join(ALGO_CHOICES)} (comma list, repeatable).")


def dtype_option(default: Optional[str] = "float16", multiple: bool = False, help_text: str = "Element type."):
    """``-d/--dtype`` (old spelling ``--datatype``): one NumPy dtype, or with ``multiple`` a list."""
    return click.option("-d", "--dtype", "--datatype", "dtype", multiple=multiple,
                        default=((default,) if multiple and default else default), show_default=bool(default),
                        callback=(parse_dtype_list if multiple else parse_dtype),
                        metavar="[" + "|".join(DTYPE_NAMES) + "]",
                        help=help_text + (" Comma list, repeatable." if multiple else ""))


def json_option(help_text: str = "Write the results as JSON."):
    return output_option("--json", "json_path", help_text)


#: old flag spellings -> today's (flags that were booleans are now off|on|both switches)
FLAG_ALIASES = {"--no-rotate": "--rotate=off", "--asymmetric": "--symmetric=off"}


class Command(click.Command):
    """A flashcomm command: ``-h`` for help, and :data:`FLAG_ALIASES` accepted."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("context_settings", dict(CONTEXT))
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, [FLAG_ALIASES.get(a, a) for a in args])


def command(name: str):
    """``@command("bench")``: a :class:`Command`."""
    return click.command(name, cls=Command)


def mpi_launch(fn=None, *, needs_gpus: Optional[str] = None,
               launch_backend: Optional[Callable[[dict], str]] = None):
    """Add ``--np``/``--no-relaunch`` and relaunch under mpiexec when needed (every command does).

    The wrapped command has a ``backend`` parameter, or ``needs_gpus`` names what it needs the
    GPUs for (``tune``: it has no CPU backend).  Started without an MPI launcher, the command
    first checks its output paths, then reruns itself on one rank per GPU, or on the CPU backend
    (:func:`launch.default_cpu_ranks`) on a host without GPUs, says so on stderr, and exits
    with the child job's status.  ``launch_backend``, given the command's parameters, returns
    the backend to run on in place of its ``backend`` parameter, after any checks of the command's
    own that must fail before a relaunch (``accuracy --model``).
    """
    if fn is None:
        return functools.partial(mpi_launch, needs_gpus=needs_gpus, launch_backend=launch_backend)

    @click.option("--np", "np_ranks", type=click.IntRange(min=1), default=None,
                  help="Ranks to relaunch with when started without mpirun "
                       "(default: one per GPU; on the CPU backend one per core, 2 to 4).")
    @click.option("--no-relaunch", is_flag=True,
                  help="Run in this process (one rank) even without mpirun.")
    @functools.wraps(fn)
    def wrapper(*args, np_ranks=None, no_relaunch=False, **kwargs):
        if not launch.under_launcher():
            # A bad output path fails now, not after the measurement (nor after a relaunch).
            check_outputs({flag: kwargs.get(dest) for dest, flag in OUTPUT_DESTS.items()})
            if needs_gpus:
                problem = _gpu_problem(1, needs_gpus)
                if problem:
                    raise click.ClickException(problem)
        backend = ("gpu" if needs_gpus else launch_backend(kwargs) if launch_backend
                   else kwargs.get("backend", "auto"))
        maybe_relaunch(backend, np_ranks, no_relaunch, who=needs_gpus)
        return fn(*args, **kwargs)
    return wrapper


def maybe_relaunch(backend: str, np_ranks: Optional[int], no_relaunch: bool, who: Optional[str] = None) -> None:
    """Relaunch and exit when :func:`launch.plan_relaunch` says so; else return.

    ``who``: what needs the GPUs, for the messages (default: "--backend gpu")."""
    if no_relaunch or launch.under_launcher() or backend == "reference":
        return  # accuracy's reference backend simulates its ranks in this process
    gpus = launch.cuda_device_count() if backend == registry.AUTO or registry.needs_gpu(backend) else 0
    if registry.needs_gpu(backend):
        require_cupy(who or f"--backend {backend}")
    try:
        plan = launch.plan_relaunch(backend, np_ranks, no_relaunch, gpus)
        if plan is None:
            return
        status = launch.relaunch(plan, original_args(), module=MAIN_MODULE,
                                 announce=lambda text: click.echo(f"flashcomm: {text}", err=True))
    except launch.LaunchError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


# ----------------------------------------------------------------------------- backend
def require_cupy(who: str = "--backend gpu") -> None:
    """:class:`click.ClickException` when CuPy is not installed; ``who`` names what needs it."""
    if importlib.util.find_spec("cupy") is None:
        raise click.ClickException(f"{who} needs CuPy: {CUPY_HINT}")


def _gpu_problem(nlocal: int, who: Optional[str] = None) -> Optional[str]:
    """Why this rank cannot run on its GPU (None when it can); local, never raises.

    ``who``: what needs the GPU, for the message (default "--backend gpu", which has a CPU
    alternative to suggest)."""
    from flashcomm_cupy import gpu_available
    if importlib.util.find_spec("cupy") is None:
        return f"{who or '--backend gpu'} needs CuPy and a CUDA GPU: {CUPY_HINT}"
    if not gpu_available():
        return (f"{who}: CuPy sees no CUDA device" if who
                else "--backend gpu: CuPy sees no CUDA device (try --backend cpu)")
    from flashcomm_cupy.backends.cuda_util import local_device_problem
    ndev = launch.cuda_device_count()
    if local_device_problem(nlocal, ndev) is not None:
        return too_few_gpus_message(nlocal, ndev, os.environ)
    return None


def too_few_gpus_message(nlocal: int, ndev: int, env) -> str:
    """Why ``nlocal`` ranks on a host that shows each of them ``ndev`` GPUs cannot run, and the fix.

    Called only where :func:`flashcomm_cupy.backends.cuda_util.local_device_problem` finds a
    problem (a rank that sees exactly one GPU, its own, is fine).  The usual cause is not a small
    host but a partial GPU binding (SLURM, or ``CUDA_VISIBLE_DEVICES`` per rank): every rank of a
    host must see all of its GPUs (it picks its own by local rank) or exactly one of its own."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None or env.get("SLURM_GPUS_PER_TASK") or env.get("SLURM_STEP_GPUS"):
        how = f"CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "SLURM's GPU binding"
        return (f"{nlocal} ranks on this host, but each sees only {ndev} GPU(s) ({how}): flashcomm needs every "
                "rank of a host to see all of the host's GPUs (it picks its own by local rank) or exactly one "
                "GPU of its own; under SLURM use --gpus-per-node=N with --gpu-bind=none, or --gpus-per-task=1")
    return (f"{nlocal} ranks on this host but only {ndev} GPU(s): "
            f"run at most {ndev} ranks per host (mpiexec -n {ndev})")


def open_communicator(backend: str, who: Optional[str] = None, **options):
    """A :class:`flashcomm_cupy.Communicator` on ``MPI.COMM_WORLD`` (collective).

    ``--backend gpu`` without CuPy, without a visible GPU, or with more ranks
    on a host than GPUs raises :class:`click.ClickException` on every rank
    (also when only some ranks, e.g. those of one host, have the problem).
    """
    from flashcomm_cupy import Communicator
    from flashcomm_cupy import _mpi
    if registry.needs_gpu(backend):
        who = who or (None if backend == "gpu" else f"--backend {backend}")
        # The checks are each rank's own (hosts and CUDA_VISIBLE_DEVICES may differ): agree
        # first, so that every rank raises or none does and all enter the collectives below.
        problem = _mpi.first_failure(_mpi.get_comm(), _gpu_problem(_mpi.local_size(), who), name_rank=True)
        if problem:
            raise click.ClickException(problem)
    try:
        return Communicator(_mpi.get_comm(), backend=backend, **options)  # the CLI runs on MPI, also under torchrun
    except ImportError as exc:
        raise click.ClickException(f"cannot start the {backend} backend: {exc}") from None


def require_quantizing_backend(comm, modes, asked: str) -> None:
    """:class:`click.ClickException` when quantized ``modes`` would run on the NCCL backend, which
    reduces losslessly only; ``asked`` is the ``--backend`` given (NCCL by name, or the fallback)."""
    if comm.backend_name != "nccl" or all(m.lossless for m in modes):
        return
    why = ("--backend nccl reduces losslessly" if asked == "nccl" else
           "the flash GPU kernels are unavailable here (the backend fell back to NCCL; see the warning above)")
    raise click.ClickException(f"{why}, so only lossless modes can run: use --bits none")


# ----------------------------------------------------------------------------- output
def make_console(rank: int, file=None):
    """A rich Console that prints on rank 0 and swallows output elsewhere.

    Anything but an interactive terminal (:func:`interactive_terminal`: pipes, files, and the
    pseudo-terminal Open MPI gives each rank) gets no colour, no control codes and no wrapping.
    """
    from rich.console import Console
    if rank != 0:
        return Console(file=io.StringIO(), width=200)
    stream = file if file is not None else sys.stdout
    if interactive_terminal(stream):
        return Console(file=stream)
    return Console(file=stream, width=output_width(stream) or 200, no_color=True, color_system=None,
                   force_terminal=False, highlight=False, emoji=False, soft_wrap=True)


MATPLOTLIB_HINT = ('--plot needs matplotlib: pip install "flashcomm-cupy[plot]" '
                   '(from a checkout: pip install -e ".[plot]")')


def output_path_problem(flag: str, path) -> Optional[str]:
    """Why ``path`` (given to ``flag``) cannot be written, or None; creates nothing."""
    if not path:
        return None
    full = os.path.abspath(os.path.expanduser(str(path)))
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        return f"{flag} {path}: is a directory"
    if not os.path.isdir(parent):
        return f"{flag} {path}: directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        return f"{flag} {path}: not writable"
    return None


def outputs_problem(outputs: Dict[str, Optional[str]]) -> Optional[str]:
    """The first problem with ``{flag: path}`` outputs, including --plot's matplotlib; None when all can work."""
    for flag, path in outputs.items():
        problem = output_path_problem(flag, path)
        if problem:
            return problem
    if outputs.get("--plot") and importlib.util.find_spec("matplotlib") is None:
        return MATPLOTLIB_HINT
    return None


def check_outputs(outputs: Dict[str, Optional[str]], mpi_comm=None) -> None:
    """Raise :class:`click.ClickException` on every rank when rank 0 cannot write an output.

    Rank 0 alone writes files, so rank 0 alone checks; with ``mpi_comm`` (collective) its verdict
    is broadcast so that every rank stops together, before any measurement.
    """
    rank = mpi_comm.Get_rank() if mpi_comm is not None else 0
    problem = outputs_problem(outputs) if rank == 0 else None
    if mpi_comm is not None and mpi_comm.Get_size() > 1:
        problem = mpi_comm.bcast(problem, root=0)
    if problem:
        raise click.ClickException(problem)


#: parameter name -> flag of every file a command writes (see :func:`output_option`)
OUTPUT_DESTS = {"json_path": "--json", "csv_path": "--csv", "plot_path": "--plot", "markdown_path": "--markdown",
                "out_path": "--out"}


def output_option(flag: str, dest: str, help_text: str):
    """A ``--json``/``--csv``/``--plot``/... file option (checked before measuring by :func:`check_outputs`)."""
    return click.option(flag, dest, type=click.Path(dir_okay=False), metavar="PATH", help=help_text)


# ----------------------------------------------------------------------------- terminal
def interactive_terminal(stream=None) -> bool:
    """True when ``stream`` (stdout) is a terminal a person watches: a TTY and no MPI launcher.

    Under Open MPI every rank's stdout is a pseudo-terminal even when mpirun writes to a log,
    so nothing started by a launcher counts as interactive (no progress bars, no control codes).
    """
    stream = sys.stdout if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return bool(tty) and not launch.under_launcher()


def output_width(stream=None) -> Optional[int]:
    """Columns a table may use on ``stream``: a terminal's width, else $COLUMNS, else None
    (no limit: pipes, files, MPICH's forwarding typed without the relaunch).

    Open MPI's per-rank pseudo-terminal reports 80 columns; the relaunch passes the user's
    terminal width to its ranks through $COLUMNS.
    """
    columns = launch.terminal_columns(stream)
    if columns:
        return columns
    value = os.environ.get("COLUMNS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return None

