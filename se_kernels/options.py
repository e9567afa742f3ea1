"""The SE op's options: their names, their integer codes, and the modules they stand for.

This module is the only place in Python that spells an option or maps it to something else.
The names are what the public API and the ops' schemas take (plain strings, which
torch.compile and the schemas handle as constants); the codes are what the kernels take
(Triton constexprs here, the enums of csrc/se_options.h in C++, which must agree:
tests/test_options.py checks both against each other).
"""

from __future__ import annotations

import enum

import torch


class Option(enum.IntEnum):
    """An option kind; a member's name in lower case is how the API spells it."""

    @property
    def spelling(self) -> str:
        return self.name.lower()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names in code order (codes are 0, 1, ...)."""
        assert [int(member) for member in cls] == list(range(len(cls)))
        return tuple(member.spelling for member in cls)


class Activation(Option):
    """Between the two FCs: h = act(a)."""
    RELU = 0
    SILU = 1
    GELU = 2       # a·Φ(a), with erf (nn.GELU())
    GELU_TANH = 3  # GELU's tanh approximation (nn.GELU(approximate="tanh"))
    HARDSWISH = 4
    LEAKY_RELU = 5  # negative slope 0.01, nn.LeakyReLU's default (LEAKY_RELU_SLOPE)


class Gate(Option):
    """On the excitation: s = gate(g)."""
    SIGMOID = 0
    HARDSIGMOID = 1
    TANH = 2
    RELU = 3


class Pool(Option):
    """The squeeze: z = mean, amax, or half of each."""
    AVG = 0
    MAX = 1
    AVGMAX = 2


class OutActivation(Option):
    """After the scale and the residual add."""
    NONE = 0
    RELU = 1


RELU, SILU, GELU, GELU_TANH, HARDSWISH, LEAKY_RELU = Activation.names()
LEAKY_RELU_SLOPE = 0.01
SIGMOID, HARDSIGMOID, TANH = Gate.names()[:3]
assert Gate.RELU.spelling == RELU  # the relu gate and the relu activation share one name
AVG, MAX, AVGMAX = Pool.names()
NONE, OUT_RELU = OutActivation.names()  # OUT_RELU == RELU: the same name in both places

ACTIVATIONS = Activation.names()
GATES = Gate.names()
POOLS = Pool.names()
OUT_ACTIVATIONS = OutActivation.names()

# Each option argument's names, in the schemas' order. Calls read these plain tuples
# (torch.compile traces them as constants), not the enums.
NAMES: dict[str, tuple[str, ...]] = {
    "activation": ACTIVATIONS, "gate": GATES, "pool": POOLS, "out_activation": OUT_ACTIVATIONS}


def code(argument: str, name: str) -> int:
    """The kernels' code for a valid name, e.g. code("pool", "avgmax") == Pool.AVGMAX == 2."""
    return NAMES[argument].index(name)


def check_choice(argument: str, value) -> None:
    """ValueError naming the argument unless `value` is one of its names."""
    choices = NAMES[argument]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")


def normalize_out_activation(value) -> str:
    """The public API's out_activation (None, "none", "identity" or "relu") as the ops'."""
    if value is None or value in (NONE, "identity"):
        return NONE
    if value == OUT_RELU:
        return OUT_RELU
    raise ValueError(f"out_activation must be None or {OUT_RELU!r}, got {value!r}")


# Activation and gate modules by qualified class name, with the option each computes: a name,
# or, for a class whose attributes choose the function, a function of the module giving the
# name (None when no option computes it). Exact classes only: a subclass may compute
# something else. `inplace` changes nothing: the op never writes its input. timm's
# Swish/SwishMe compute x * sigmoid(x), its HardSigmoid relu6(x + 3) / 6 and its
# HardSwish x * relu6(x + 3) / 6, the same functions as nn.SiLU, nn.Hardsigmoid and
# nn.Hardswish. HardSigmoidMe, HardSwish and HardSwishMe differ from the op only in the
# subgradient at exactly +-3 (a measure-zero set the op shares with torch's own functions).
def _gelu_option(module) -> str | None:
    return {"none": GELU, "tanh": GELU_TANH}.get(getattr(module, "approximate", None))


def _leaky_relu_option(module) -> str | None:
    return LEAKY_RELU if getattr(module, "negative_slope", None) == LEAKY_RELU_SLOPE else None


ACTIVATION_CLASSES = {
    "torch.nn.modules.activation.ReLU": RELU,
    "torch.nn.modules.activation.SiLU": SILU,
    "torch.nn.modules.activation.GELU": _gelu_option,
    "torch.nn.modules.activation.Hardswish": HARDSWISH,
    "torch.nn.modules.activation.LeakyReLU": _leaky_relu_option,
    "timm.layers.activations.Swish": SILU,
    "timm.layers.activations_me.SwishMe": SILU,
    "timm.layers.activations.GELU": GELU,
    "timm.layers.activations.GELUTanh": GELU_TANH,
    "timm.layers.activations.HardSwish": HARDSWISH,
    "timm.layers.activations_me.HardSwishMe": HARDSWISH,
}
GATE_CLASSES = {
    "torch.nn.modules.activation.Sigmoid": SIGMOID,
    "torch.nn.modules.activation.Hardsigmoid": HARDSIGMOID,
    "torch.nn.modules.activation.Tanh": TANH,
    "torch.nn.modules.activation.ReLU": RELU,
    "timm.layers.activations.Sigmoid": SIGMOID,
    "timm.layers.activations.HardSigmoid": HARDSIGMOID,
    "timm.layers.activations_me.HardSigmoidMe": HARDSIGMOID,
    "timm.layers.activations.Tanh": TANH,
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_option(module, classes: dict) -> str | None:
    """The option `module` computes by `classes` (ACTIVATION_CLASSES or GATE_CLASSES), or
    None when none does."""
    entry = classes.get(qualified_name(type(module)))
    return entry(module) if callable(entry) else entry


# torch.nn modules computing each option, by name (the inverse of the tables' torch.nn
# entries): what SqueezeExcitation's documentation lists and what tests build eager blocks
# with.
ACTIVATION_MODULES = {
    RELU: torch.nn.ReLU, SILU: torch.nn.SiLU, GELU: torch.nn.GELU,
    GELU_TANH: lambda: torch.nn.GELU(approximate="tanh"), HARDSWISH: torch.nn.Hardswish,
    LEAKY_RELU: lambda: torch.nn.LeakyReLU(LEAKY_RELU_SLOPE)}
GATE_MODULES = {SIGMOID: torch.nn.Sigmoid, HARDSIGMOID: torch.nn.Hardsigmoid, TANH: torch.nn.Tanh,
                RELU: torch.nn.ReLU}
