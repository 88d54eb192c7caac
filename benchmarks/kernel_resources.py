"""Registers and local memory (spills) of every product kernel as this machine's NVRTC builds them.

    python benchmarks/kernel_resources.py [--json OUT.json]

benchmarks/sass_diff.py reads ptxas's resource lines from an nvcc build on the team machine; the
GPU host builds the modules with its own NVRTC (flashcomm_cupy.backends.flash.kernels), whose
register allocation can differ.  This prints what the device really runs: one line per
(specialisation, kernel), the specialisations of sass_diff.py, from CuPy's function attributes.
Local memory above 0 bytes means spills (or a stack frame).  Needs one GPU; modules come from the
kernel cache when an earlier process built them.
"""
from __future__ import annotations

import argparse
import json
import sys

from sass_diff import specialisations

KERNELS = ("fc_twoshot", "fc_twoshot_staged", "fc_oneshot", "fc_ll_oneshot", "fc_ll_twoshot",
           "fc_llq_twoshot", "fc_llq_oneshot", "fc_llq_oneshot_rot")


#: CUfunction_attribute values (cuda.h): what the driver reports per kernel, and CuPy's names for them
ATTR_LOCAL_SIZE_BYTES = 3
ATTR_NUM_REGS = 4
ATTR_NAMES = {ATTR_LOCAL_SIZE_BYTES: "local_size_bytes", ATTR_NUM_REGS: "num_regs"}


def _attribute(function, attr: int) -> int:
    """One attribute of a kernel: CuPy 14's RawModule.get_function returns a RawKernel (its
    ``attributes`` dict); older CuPy a driver Function (its ``ptr``)."""
    if hasattr(function, "attributes"):
        return int(function.attributes[ATTR_NAMES[attr]])
    from cupy.cuda import driver
    return int(driver.funcGetAttribute(attr, function.ptr))


def _defines(defines) -> dict:
    return {k: int(v) for k, v in (d.split("=") for d in defines)}


def resources():
    """[(specialisation, kernel, registers, local bytes)] for every kernel each module has."""
    from flashcomm_cupy.backends.flash import kernels
    rows = []
    for name, defines in specialisations():
        d = _defines(defines)
        mod = kernels.module(d["FC_DT"], d["FC_RS_BITS"], d["FC_AG_BITS"], d.get("FC_ELEMS", 32))
        for kernel in KERNELS:
            try:
                f = mod.get_function(kernel)
            except Exception:  # not built into this specialisation
                continue
            rows.append((name, kernel, _attribute(f, ATTR_NUM_REGS), _attribute(f, ATTR_LOCAL_SIZE_BYTES)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows as JSON")
    args = ap.parse_args(argv)
    rows = resources()
    for name, kernel, regs, local in rows:
        print(f"{name:18s} {kernel:18s} {regs:4d} registers {local:5d} B local{'  <- spills' if local else ''}")
    print(f"{sum(1 for r in rows if r[3])} of {len(rows)} kernels use local memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("specialisation", "kernel", "registers", "local_bytes"), r)) for r in rows], f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
