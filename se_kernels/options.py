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


class Gate(Option):
    """On the excitation: s = gate(g)."""
    SIGMOID = 0
    HARDSIGMOID = 1


class Pool(Option):
    """The squeeze: z = mean, amax, or half of each."""
    AVG = 0
    MAX = 1
    AVGMAX = 2


class OutActivation(Option):
    """After the scale and the residual add."""
    NONE = 0
    RELU = 1


RELU, SILU = Activation.names()
SIGMOID, HARDSIGMOID = Gate.names()
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


# Activation and gate modules by qualified class name, with the option each computes. Exact
# classes only: a subclass may compute something else. timm's Swish/SwishMe compute
# x * sigmoid(x) and its HardSigmoid relu6(x + 3) / 6, the same functions as nn.SiLU and
# nn.Hardsigmoid (HardSigmoidMe differs only in the subgradient at exactly +-3, where it
# takes 1/6 and the op takes 0, as nn.Hardsigmoid does). `inplace` changes nothing: the op
# never writes its input.
ACTIVATION_CLASSES = {
    "torch.nn.modules.activation.ReLU": RELU,
    "torch.nn.modules.activation.SiLU": SILU,
    "timm.layers.activations.Swish": SILU,
    "timm.layers.activations_me.SwishMe": SILU,
}
GATE_CLASSES = {
    "torch.nn.modules.activation.Sigmoid": SIGMOID,
    "torch.nn.modules.activation.Hardsigmoid": HARDSIGMOID,
    "timm.layers.activations.Sigmoid": SIGMOID,
    "timm.layers.activations.HardSigmoid": HARDSIGMOID,
    "timm.layers.activations_me.HardSigmoidMe": HARDSIGMOID,
}


def _torch_modules(classes: dict[str, str]) -> dict[type, str]:
    prefix = "torch.nn.modules.activation."
    return {getattr(torch.nn, qualname[len(prefix):]): name
            for qualname, name in classes.items() if qualname.startswith(prefix)}


# The torch.nn modules SqueezeExcitation takes (nn.ReLU -> "relu", ...), and back.
TORCH_ACTIVATIONS = _torch_modules(ACTIVATION_CLASSES)
TORCH_GATES = _torch_modules(GATE_CLASSES)
