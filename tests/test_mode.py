"""A :class:`~flashcomm_cupy.config.Mode` is exactly what the caller asked for, or a one-line error:
no argument is coerced into another setting (``bool("no")`` is True, ``int(128.9)`` is 128)."""
from __future__ import annotations

import numpy as np
import pytest

from flashcomm_cupy.config import Mode


@pytest.mark.parametrize("name", ["rotate", "symmetric"])
@pytest.mark.parametrize("bad", ["no", "False", "off", "", None, 2, 0.0, [True]])
def test_a_switch_is_a_bool_not_anything_truthy(name, bad):
    with pytest.raises(TypeError, match=f"{name} must be True or False, got "):
        Mode.make(8, **{name: bad})
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        Mode(**{name: bad})


@pytest.mark.parametrize("good, want", [(True, True), (False, False), (np.bool_(True), True), (1, True), (0, False)])
def test_bools_numpy_bools_and_0_or_1_are_switches(good, want):
    assert Mode.make(8, rotate=good, symmetric=good) == Mode.make(8, rotate=want, symmetric=want)
    direct = Mode(rotate=good, symmetric=good, group_size=np.int64(64))
    assert direct.rotate is want and direct.symmetric is want and type(direct.group_size) is int


@pytest.mark.parametrize("bad", [128.9, 128.0, "128", True, None])
def test_a_group_size_is_an_integer(bad):
    with pytest.raises(TypeError, match=r"group_size must be an integer, one of \(32, .*got "):
        Mode.make(8, group_size=bad)


def test_a_numpy_integer_group_size_is_that_integer_and_an_unsupported_one_names_the_choices():
    assert Mode.make(8, group_size=np.int64(64)).group_size == 64
    with pytest.raises(ValueError, match="group_size must be one of"):
        Mode.make(8, group_size=100)


def test_a_vendor_algorithm_with_a_quantized_mode_says_what_to_pass_instead():
    with pytest.raises(ValueError) as err:
        Mode.make(8, algo="mpi")
    text = str(err.value)
    assert "\n" not in text and text.endswith("; pass bits=None to run it"), text
