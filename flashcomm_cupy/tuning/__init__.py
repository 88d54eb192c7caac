"""The tuning table's old import path: everything lives in :mod:`flashcomm_cupy.backends.flash.table`
(format, search order, loader); this package keeps the shipped ``default.json``."""
from ..backends.flash.table import (FORMAT, PROTOCOLS, SHIPPED, USER, Choice, TuningTable, dumps,  # noqa: F401
                                    heuristic, heuristic_candidates, load, merge, upgrade, world_key)
