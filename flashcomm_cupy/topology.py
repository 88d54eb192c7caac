"""Which ranks share a node: the layout the hierarchical all-reduce is built on.

Pure data (standard library only), so the NumPy reference, every backend and
the CLI describe nodes the same way.  Discovery from MPI lives in
:func:`flashcomm_cupy._mpi.node_layout`.

Conventions, relied on by the reference and every backend:

* nodes are numbered in the order of their lowest global rank;
* within a node, ranks keep their global order: a rank's *local rank* is its
  position in its node;
* the hierarchical all-reduce needs the same number of ranks on every node
  (``ranks_per_node``): the ranks with local rank ``p`` on every node own the
  same shard of the message and exchange it with each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

@dataclass(frozen=True)
class NodeLayout:
    """The global ranks of each node, nodes in order of their lowest rank, ranks ascending."""

    nodes: Tuple[Tuple[int, ...], ...]

    def __post_init__(self):
        ranks = sorted(r for node in self.nodes for r in node)
        if not self.nodes or any(not node for node in self.nodes) or ranks != list(range(len(ranks))):
            raise ValueError(f"a node layout must place ranks 0..N-1 once each on non-empty nodes, got {self.nodes}")
        canonical = tuple(sorted((tuple(sorted(node)) for node in self.nodes), key=lambda node: node[0]))
        if canonical != self.nodes:
            raise ValueError(f"node layout {self.nodes} is not canonical: use NodeLayout.from_node_keys")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_node_keys(cls, keys: Sequence) -> "NodeLayout":
        """The layout where ranks with equal ``keys[rank]`` (e.g. a hostname) share a node."""
        by_key = {}
        for rank, key in enumerate(keys):
            by_key.setdefault(key, []).append(rank)
        return cls(tuple(sorted((tuple(v) for v in by_key.values()), key=lambda node: node[0])))

    @classmethod
    def blocks(cls, world_size: int, ranks_per_node: int) -> "NodeLayout":
        """Consecutive blocks of ``ranks_per_node`` ranks: node ``k`` holds ranks ``[kP, (k+1)P)``.

        This is the testing override (``ranks_per_node=`` or
        ``$FLASHCOMM_RANKS_PER_NODE``): it pretends the ranks of one host are
        several nodes, so the hierarchical algorithm runs on one machine.
        """
        p = check_ranks_per_node(ranks_per_node, world_size)
        return cls(tuple(tuple(range(k * p, (k + 1) * p)) for k in range(world_size // p)))

    @classmethod
    def single(cls, world_size: int) -> "NodeLayout":
        return cls.blocks(world_size, world_size)

    # ------------------------------------------------------------------ facts
    @property
    def world_size(self) -> int:
        return sum(len(node) for node in self.nodes)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def uniform(self) -> bool:
        """True when every node holds the same number of ranks."""
        return len({len(node) for node in self.nodes}) == 1

    @property
    def spans_nodes(self) -> bool:
        return self.num_nodes > 1

    def require_uniform(self) -> None:
        """ValueError (one line) unless every node holds the same number of ranks."""
        if not self.uniform:
            sizes = ", ".join(f"node {k}: {len(node)}" for k, node in enumerate(self.nodes))
            raise ValueError(f"the hierarchical all-reduce needs the same number of ranks on every node ({sizes})")

    @property
    def ranks_per_node(self) -> int:
        """Ranks on each node; ValueError (one line) when nodes differ in size."""
        self.require_uniform()
        return len(self.nodes[0])

    def node_of(self, rank: int) -> int:
        for k, node in enumerate(self.nodes):
            if rank in node:
                return k
        raise ValueError(f"rank {rank} is not in this {self.world_size}-rank layout")

    def local_rank(self, rank: int) -> int:
        return self.nodes[self.node_of(rank)].index(rank)

    def label(self) -> str:
        """Human summary, e.g. ``2 nodes x 2 ranks`` or ``2 nodes (3, 1 ranks)``."""
        if self.uniform:
            p = len(self.nodes[0])
            return f"{self.num_nodes} node{'s' if self.num_nodes > 1 else ''} x {p} rank{'s' if p > 1 else ''}"
        return f"{self.num_nodes} nodes ({', '.join(str(len(n)) for n in self.nodes)} ranks)"


def check_ranks_per_node(value, world_size: int, source: str = "ranks_per_node") -> int:
    """``value`` as a positive int dividing ``world_size``; ValueError (one line) otherwise."""
    try:
        p = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{source} must be a positive integer, got {value!r}") from None
    if p < 1 or world_size % p:
        raise ValueError(f"{source}={p} must be a positive divisor of the world size {world_size}")
    return p
