"""Argument checks used everywhere in coreset-ext: one place, one message style.

Modelled on scikit-learn's declarative parameter constraints: a parameter is described by a list
of constraints (an `Interval` of ints or reals, a set of `Options`, `None`, a type), and
`check(name, value, *constraints)` accepts the value if any constraint does, or raises a
ValueError worded the same way everywhere:

    <name> must be <what each constraint accepts, joined by "or">, got <value>

Conventions every check keeps: `True`/`False` are not numbers (Python's bool is an int, a count
of True is a bug); numpy scalars are numbers; NaN satisfies no interval. Tensor checks name the
argument and describe what was passed (`describe`).

Example:
    >>> from coreset_ext._validation import Interval, check
    >>> check("n_clusters", 8, Interval(int, 1, None))
    8
    >>> check("tol", True, Interval(float, 0, None))
    Traceback (most recent call last):
    ...
    ValueError: tol must be a real number >= 0, got True
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def is_int(value) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number that is not a bool (ints and numpy scalars included; NaN is a real here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Interval:
    """Numbers of one kind (`int` or `float`; float accepts ints too) between two bounds.

    A bound of None is unbounded. `closed` says which ends belong: "both", "left", "right" or
    "neither" (an open end excludes the bound itself).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def accepts(self, value) -> bool:
        if not (is_int(value) if self.kind is int else is_real(value)):
            return False
        v = float(value) if self.kind is float else int(value)
        if self.kind is float and math.isnan(v):
            return False
        if self.low is not None and (v < self.low or (v == self.low and self.closed in ("right", "neither"))):
            return False
        if self.high is not None and (v > self.high or (v == self.high and self.closed in ("left", "neither"))):
            return False
        return True

    def describe(self) -> str:
        what = "an int" if self.kind is int else "a real number"
        low_op = ">=" if self.closed in ("both", "left") else ">"
        high_op = "<=" if self.closed in ("both", "right") else "<"
        if self.low is not None and self.high is not None:
            lo = "[" if low_op == ">=" else "("
            hi = "]" if high_op == "<=" else ")"
            return f"{what} in {lo}{_fmt(self.low)}, {_fmt(self.high)}{hi}"
        if self.low is not None:
            return f"{what} {low_op} {_fmt(self.low)}"
        if self.high is not None:
            return f"{what} {high_op} {_fmt(self.high)}"
        return what

    def convert(self, value):
        return int(value) if self.kind is int else float(value)


def _fmt(bound: float) -> str:
    if isinstance(bound, int) and abs(bound) >= 2**32 and (abs(bound) & (abs(bound) - 1)) == 0:
        return ("-" if bound < 0 else "") + f"2**{abs(bound).bit_length() - 1}"  # a seed range
    return str(int(bound)) if float(bound).is_integer() else str(bound)


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (strings, usually); compared with ==, never by type coercion."""

    values: tuple

    def __init__(self, *values) -> None:
        object.__setattr__(self, "values", tuple(values))

    def accepts(self, value) -> bool:
        # same type as well as equal: True is not 1, and 1.0 is not the option 1
        return any(type(value) is type(v) and value == v for v in self.values)

    def describe(self) -> str:
        if len(self.values) == 1:
            return repr(self.values[0])
        return "one of " + ", ".join(repr(v) for v in self.values)

    def convert(self, value):
        return value


def _accepts(constraint, value) -> bool:
    if constraint is None:
        return value is None
    if isinstance(constraint, type):
        return isinstance(value, constraint) and not (constraint is not bool and isinstance(value, bool))
    return constraint.accepts(value)


def _describe_constraint(constraint) -> str:
    if constraint is None:
        return "None"
    if isinstance(constraint, type):
        return {bool: "a bool", str: "a string"}.get(constraint, f"a {constraint.__name__}")
    return constraint.describe()


def check(name: str, value, *constraints):
    """Returns `value` (an int for an int interval, a float for a real one) if any constraint
    accepts it, else raises ValueError naming `name`, what it accepts and what it got."""
    for constraint in constraints:
        if _accepts(constraint, value):
            return constraint.convert(value) if isinstance(constraint, Interval) else value
    expected = " or ".join(_describe_constraint(c) for c in constraints)
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_params(params: Mapping[str, Any], constraints: Mapping[str, Iterable]) -> dict[str, Any]:
    """`check` applied to each named parameter; returns the converted values by name."""
    return {name: check(name, params[name], *rule) for name, rule in constraints.items()}


# Shorthands for the constraints that recur.
POSITIVE_INT = Interval(int, 1, None)
NONNEGATIVE_INT = Interval(int, 0, None)
FRACTION = Interval(float, 0, 1, closed="right")  # a share of a data set: (0, 1]
# What torch.Generator.manual_seed takes.
SEED = Interval(int, -2**63, 2**64, closed="left")


REDUCTIONS = Options("mean", "sum", "none")

# Below this, logits s / t of unit rows exceed what fp32 exponent arithmetic survives (t = 1e-30
# gives NaN gradients, 1e-40 a NaN loss); contrastive learning uses 0.01 .. 1.
MIN_TEMPERATURE = 1e-4


def check_reduction(reduction) -> str:
    """A loss reduction: one of REDUCTIONS (a cheap test first: it runs on every training step)."""
    if type(reduction) is str and reduction in REDUCTIONS.values:
        return reduction
    return check("reduction", reduction, REDUCTIONS)


def check_temperature(temperature) -> float:
    """A contrastive temperature: a finite real number >= MIN_TEMPERATURE."""
    if type(temperature) is float and MIN_TEMPERATURE <= temperature < math.inf:
        return temperature  # the usual case, decided without the general machinery (every step)
    t = check("temperature", temperature, Interval(float, MIN_TEMPERATURE, None))
    if not math.isfinite(t):
        raise ValueError(f"temperature must be a finite real number >= {MIN_TEMPERATURE}, got {temperature!r}")
    return t


def positive_int(name: str, value) -> int:
    return check(name, value, POSITIVE_INT)


def nonnegative_int(name: str, value) -> int:
    return check(name, value, NONNEGATIVE_INT)


def finite_float(name: str, value) -> float:
    v = check(name, value, Interval(float))
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return v


# ---------------------------------------------------------------------------------- tensors


def describe(x) -> str:
    """What was passed, for error messages: dtype, shape and device of a tensor, else the type."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_tensor(name: str, x, *, dim: int, dtypes: Iterable[torch.dtype], what: str = "") -> torch.Tensor:
    """x must be a `dim`-D tensor of one of `dtypes`; `what` says what its axes are ("[n, d]")."""
    dtypes = tuple(dtypes)
    if not isinstance(x, torch.Tensor) or x.dim() != dim or x.dtype not in dtypes:
        shape = f" {what}" if what else ""
        raise ValueError(f"{name} must be a {dim}-D {_dtype_names(dtypes)} tensor{shape}, got {describe(x)}")
    return x


def check_per_row(name: str, t, of: str, rows_of: torch.Tensor, *, dtypes: Iterable[torch.dtype],
                  entries: str = "entries") -> torch.Tensor:
    """t: a 1-D tensor of `dtypes` holding one of its `entries` per row of `rows_of` (named `of`),
    on the same device (labels per embedding, dataset indices per batch row)."""
    check_tensor(name, t, dim=1, dtypes=dtypes)
    if t.shape[0] != rows_of.shape[0]:
        raise ValueError(f"{name} has {t.shape[0]} {entries} but {of} has {rows_of.shape[0]} rows")
    check_same_device(**{of: rows_of, name: t})
    return t


def check_indices(name: str, value, *, what: str = "indices") -> torch.Tensor:
    """`value` (a tensor, numpy array or sequence of ints) as a 1-D int64 CPU tensor of `what`.
    Floats, bools, strings, ints beyond int64 and anything not 1-D are a ValueError naming `name`:
    an index is never truncated (1.5 is not 1) nor a mask read as indices.

    Example:
        >>> check_indices("picks", [3, 1])
        tensor([3, 1])
        >>> check_indices("picks", [1.5])
        Traceback (most recent call last):
        ...
        ValueError: picks must be a 1-D sequence of integer indices, got float64 of shape (1,)
    """
    if not isinstance(value, torch.Tensor):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):  # ragged nesting
            raise ValueError(f"{name} must be a 1-D sequence of integer {what}, got {value!r:.80}") from None
        if array.size == 0:
            array = array.astype(np.int64)  # [] reads as float
        too_big = array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max
        if array.dtype.kind not in "iu" or too_big or array.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of integer {what}, got {array.dtype} of shape "
                             f"{array.shape}")  # object dtype: ints beyond int64, a set, a generator
        return torch.from_numpy(array.astype(np.int64))
    if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        dtype = str(value.dtype).replace("torch.", "")
        raise ValueError(f"{name} must be a 1-D sequence of integer {what}, got {dtype} of shape {tuple(value.shape)}")
    return value.long().cpu()


def check_same_device(**tensors: torch.Tensor) -> None:
    """Every tensor on the first one's device (ValueError naming both otherwise)."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}: they must share a device")


# Entries beyond this overflow float32 once squared and summed over a row (norms, distances):
# 1e17 squared is 1e34, and rows of up to 34,000 features keep the sum below float32's 3.4e38.
FLOAT32_SQUARES_LIMIT = 1e17


def check_finite(name: str, x: torch.Tensor, *, float32_squares: bool = False) -> None:
    """x holds no NaN or Inf. With `float32_squares` (ops that compute norms or distances in
    float32), a non-float64 x must also keep |x| < FLOAT32_SQUARES_LIMIT: beyond it the squares
    overflow and the result would silently be wrong. One host synchronisation on a GPU; traced
    out under torch.compile."""
    if torch.compiler.is_compiling() or not x.numel():
        return
    bounded = float32_squares and x.dtype != torch.float64
    ok = (x.abs() < FLOAT32_SQUARES_LIMIT).all() if bounded else torch.isfinite(x).all()
    if bool(ok):
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    raise ValueError(f"{name} has entries of magnitude {float(x.abs().max()):.3g}, beyond {FLOAT32_SQUARES_LIMIT:g}: "
                     "their squares overflow float32 (scale the rows down, or pass float64)")
