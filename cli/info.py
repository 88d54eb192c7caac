"""``flashcomm info``: versions, ranks and devices, topology, workspace and tuning in use."""
from __future__ import annotations

import json

from .options import (backend_option, check_outputs, command, json_option, make_console, mpi_launch,
                      open_communicator, output_width, transport_option)

#: message sizes at which ``info`` shows what ``algo="auto"`` picks
AUTO_PROBE_BYTES = (4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20)


def collect_info(comm) -> dict:
    """Everything ``info`` shows, as plain data (collective; identical on every rank)."""
    from flashcomm_cupy.config import Mode
    from flashcomm_cupy.harness import machine
    from flashcomm_cupy.harness.sizes import format_size

    backend = comm.backend
    descriptions = machine.gather_descriptions(backend, comm.mpi_comm)
    d0 = descriptions[0]
    auto = {}
    for label, bits in (("lossless", None), ("int8", 8), ("int4", 4)):
        mode = Mode.make(bits, algo="auto")
        auto[label] = {format_size(n): _pick(backend, n, mode) for n in AUTO_PROBE_BYTES}
    return {
        "backend": backend.name,
        "baseline": backend.baseline_algo,
        "world_size": backend.world_size,
        "nodes": d0.get("nodes"),
        "algos": list(backend.supported_algos()),
        "auto_algo": auto,
        "versions": machine.software_versions(d0),
        "ranks": [machine.rank_summary(d, backend.name) for d in descriptions],
        "peer_access": d0.get("peer_access"),
        "topology": d0.get("topology"),
        "workspace_bytes": d0.get("workspace_bytes"),
        "transport": d0.get("transport"),
        "tuning_table": d0.get("tuning_table"),
        "describe": descriptions,
    }


def _pick(backend, nbytes: int, mode) -> str:
    """The algorithm ``auto`` runs, with "/ll" where the data-as-signal kernels run it."""
    algo = backend.resolve_algo(nbytes, mode)
    return f"{algo}/ll" if backend.resolve_protocol(nbytes, mode) == "ll" else algo


def render_info(console, info: dict, width=None) -> None:
    from . import report
    from .table import plain_table

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    for line in report.info_lines(info):
        say(line)
    say(f"  {'algorithms':<14} {', '.join(info['algos'])}")
    if info.get("nodes"):
        say(f"  {'nodes':<14} {info['nodes']}")
    for line in report.ranks_table_lines(info["ranks"], width):
        say(line)
    auto = info["auto_algo"]
    sizes = list(next(iter(auto.values())).keys())
    say("algo='auto' picks:")
    for line in plain_table(["mode", *sizes], [[label, *[picks[s] for s in sizes]] for label, picks in auto.items()],
                            [False] * (1 + len(sizes)), width):
        say(line)
    if info.get("peer_access"):
        for line in report.matrix_table_lines(info["peer_access"], "peer access (row can access column)", width):
            say(line)
    if info.get("topology"):
        console.print("topology:", markup=False)
        console.print(str(info["topology"]), markup=False, highlight=False)
    if info.get("transport"):
        console.print(f"transport: {info['transport']}", markup=False)
    if info.get("workspace_bytes") is not None:
        console.print(f"workspace: {info['workspace_bytes']} bytes per rank", markup=False)
    if info.get("tuning_table") is not None:
        table_text = info["tuning_table"]
        if not isinstance(table_text, str):
            table_text = json.dumps(table_text, indent=1, default=str)
        console.print("tuning table in use:", markup=False)
        console.print(table_text, markup=False, highlight=False)


@command("info")
@backend_option()
@json_option("Also write everything shown (and each rank's full describe()) as JSON.")
@transport_option
@mpi_launch
def info(backend, json_path):
    """Show versions, every rank's host/device, topology, workspace and the tuning in use."""
    from flashcomm_cupy.harness.results import write_document

    comm = open_communicator(backend)
    with comm:
        check_outputs({"--json": json_path}, comm.mpi_comm)
        data = collect_info(comm)
        if comm.rank == 0:
            render_info(make_console(0), data, output_width())
            if json_path:
                write_document(json_path, "info", data)
        comm.mpi_comm.Barrier()
