"""flashcomm's all-reduce as PyTorch custom ops, for ``torch.compile`` and ``torch.cuda.graph``.

Importing this module (it imports torch) registers two ops:

``torch.ops.flashcomm.all_reduce(x, handle, rs_bits, ag_bits, group_size, algo, rotate, symmetric) -> Tensor``
    out of place: a new tensor holding the sum of ``x`` over the ranks;
``torch.ops.flashcomm.all_reduce_(x, handle, ...) -> None``
    in place: ``x`` is overwritten with the sum (declared as mutating ``x``).

``handle`` is the integer every communicator gets at construction
(:attr:`flashcomm_cupy.Communicator.torch_handle`, released by ``close()``):
custom ops take tensors and plain scalars, not Python objects.  ``rs_bits``/``ag_bits`` 0 means
lossless.  Both ops have fake (meta) implementations, so ``torch.compile``
traces through them without a graph break; under ``torch.cuda.graph`` they
launch on the capture stream like any eager call (warm up once outside the
capture, so kernels are compiled and plans built before it).

:func:`all_reduce` and :func:`all_reduce_` are the friendly forms
(``bits=`` as in :meth:`Communicator.all_reduce`).
"""
from __future__ import annotations

import torch

from .communicator import communicator_by_handle as communicator
from .config import ALL_REDUCE_BITS, parse_bits


def _bits(rs_bits: int, ag_bits: int):
    return None if rs_bits == 0 else (rs_bits, ag_bits)


@torch.library.custom_op("flashcomm::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, handle: int, rs_bits: int, ag_bits: int, group_size: int, algo: str,
                   rotate: bool, symmetric: bool) -> torch.Tensor:
    # out=None: the communicator allocates the result (a hit of its eager cache needs no out pointer)
    return communicator(handle).all_reduce(x.contiguous(), bits=_bits(rs_bits, ag_bits), group_size=group_size,
                                           algo=algo, rotate=rotate, symmetric=symmetric)


@_all_reduce_op.register_fake
def _all_reduce_fake(x, handle, rs_bits, ag_bits, group_size, algo, rotate, symmetric):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("flashcomm::all_reduce_", mutates_args=("x",))
def _all_reduce_inplace_op(x: torch.Tensor, handle: int, rs_bits: int, ag_bits: int, group_size: int, algo: str,
                           rotate: bool, symmetric: bool) -> None:
    communicator(handle).all_reduce(x, bits=_bits(rs_bits, ag_bits), group_size=group_size, algo=algo,
                                    rotate=rotate, symmetric=symmetric, out=x)


@_all_reduce_inplace_op.register_fake
def _all_reduce_inplace_fake(x, handle, rs_bits, ag_bits, group_size, algo, rotate, symmetric):
    return None


def _op_args(comm, bits, group_size, algo, rotate, symmetric):
    rs, ag = parse_bits(bits)
    return comm.torch_handle, rs or 0, ag or 0, int(group_size), str(algo), bool(rotate), bool(symmetric)


def all_reduce(comm, x: torch.Tensor, bits=ALL_REDUCE_BITS, group_size: int = 128, algo: str = "auto",
               rotate: bool = False, symmetric: bool = False) -> torch.Tensor:
    """``comm.all_reduce(x, ...)`` as the out-of-place op: a new tensor (traceable by ``torch.compile``)."""
    return torch.ops.flashcomm.all_reduce(x, *_op_args(comm, bits, group_size, algo, rotate, symmetric))


def all_reduce_(comm, x: torch.Tensor, bits=ALL_REDUCE_BITS, group_size: int = 128, algo: str = "auto",
                rotate: bool = False, symmetric: bool = False) -> torch.Tensor:
    """``comm.all_reduce(x, out=x, ...)`` as the in-place op; returns ``x``."""
    torch.ops.flashcomm.all_reduce_(x, *_op_args(comm, bits, group_size, algo, rotate, symmetric))
    return x
