"""The options: Python's names and codes (se_kernels.options) are those of the
C++ header the CPU and CUDA kernels share (csrc/se_options.h), and the API maps modules
and spellings through it."""

import re
from pathlib import Path

import pytest
from torch import nn

from se_kernels import options, schedule
from se_kernels.options import (ACTIVATIONS, GATES, OUT_ACTIVATIONS, POOLS, Activation, Gate,
                                   OutActivation, Pool)

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "se_options.h"
KINDS = {"Activation": Activation, "Gate": Gate, "Pool": Pool, "OutActivation": OutActivation}


def header_enums() -> dict[str, dict[str, int]]:
    """enum class Name : int { Member = code, ... } from the header."""
    text = HEADER.read_text()
    enums = {}
    for name, body in re.findall(r"enum class (\w+) : int \{([^}]*)\}", text):
        enums[name] = {m: int(v) for m, v in re.findall(r"(\w+) = (\d+)", body)}
    return enums


def header_names() -> dict[str, dict[str, str]]:
    """The spellings: {"relu", Activation::ReLU} entries of the k*Names tables."""
    text = HEADER.read_text()
    names = {}
    for spelling, kind, member in re.findall(r'\{"(\w+)",\s*(\w+)::(\w+)\}', text):
        names.setdefault(kind, {})[spelling] = member
    return names


def test_header_declares_every_kind():
    assert set(header_enums()) == set(KINDS)
    assert set(header_names()) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_codes_and_names_agree_with_the_header(kind):
    enum = header_enums()[kind]
    spellings = header_names()[kind]
    python = KINDS[kind]
    # The same names, each for the member with the same code.
    assert set(spellings) == set(python.names())
    for spelling, member in spellings.items():
        assert enum[member] == int(python[spelling.upper()]), (kind, spelling)
    assert sorted(enum.values()) == sorted(int(m) for m in python)


def test_names_are_what_the_api_takes():
    assert options.ACTIVATIONS == ("relu", "silu")
    assert options.GATES == ("sigmoid", "hardsigmoid")
    assert options.POOLS == ("avg", "max", "avgmax")
    assert options.OUT_ACTIVATIONS == ("none", "relu")
    assert options.OUT_RELU == options.RELU
    assert options.code("pool", "avgmax") == Pool.AVGMAX == 2
    assert options.code("gate", "hardsigmoid") == Gate.HARDSIGMOID == 1


def test_check_choice_names_the_argument():
    options.check_choice("pool", "max")
    with pytest.raises(ValueError, match="gate must be one of 'sigmoid', 'hardsigmoid', got 'tanh'"):
        options.check_choice("gate", "tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        options.check_choice("activation", 1)


@pytest.mark.parametrize("value, expected", [(None, "none"), ("none", "none"),
                                             ("identity", "none"), ("relu", "relu")])
def test_out_activation_spellings(value, expected):
    assert options.normalize_out_activation(value) == expected


def test_torch_modules_map_to_names():
    assert options.TORCH_ACTIVATIONS == {nn.ReLU: "relu", nn.SiLU: "silu"}
    assert options.TORCH_GATES == {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
    for classes in (options.ACTIVATION_CLASSES, options.GATE_CLASSES):
        assert set(classes.values()) <= set(options.ACTIVATIONS + options.GATES)


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


@pytest.mark.parametrize("enum, names", [("TraceKernel", schedule.CUDA_TRACE_KERNELS),
                                         ("TraceTensor", schedule.TRACE_TENSORS)])
def test_plan_trace_codes_agree_with_the_cuda_planner(enum, names):
    """The codes of the cuda schedule's trace (csrc/cuda/se_plan.h) index the names that
    se_kernels.plan decodes them with, in order."""
    text = (HEADER.parent / "cuda" / "se_plan.h").read_text()
    body = re.search(rf"enum class {enum} : int64_t \{{([^}}]*)\}}", text).group(1)
    members = re.findall(r"\b([A-Z]\w*)", body)
    assert members[0] + " = 0" in " ".join(body.split())
    assert tuple(snake_case(m) for m in members) == names


def test_the_oracle_has_one_entry_per_option_value():
    """The float64 oracle writes each option value's math once, in a table keyed by the
    names of se_kernels.options: a value without its entry fails here, not as a wrong answer."""
    import oracle

    assert tuple(oracle.ACTIVATIONS) == ACTIVATIONS
    assert tuple(oracle.GATES) == GATES
    assert tuple(oracle.POOL_WEIGHTS) == POOLS
    assert tuple(oracle.OUT_RELU) == OUT_ACTIVATIONS
