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
    assert options.ACTIVATIONS == ("relu", "silu", "gelu", "gelu_tanh", "hardswish", "leaky_relu")
    assert options.GATES == ("sigmoid", "hardsigmoid", "tanh", "relu")
    assert options.POOLS == ("avg", "max", "avgmax")
    assert options.OUT_ACTIVATIONS == ("none", "relu")
    assert options.OUT_RELU == options.RELU
    assert options.code("pool", "avgmax") == Pool.AVGMAX == 2
    assert options.code("gate", "hardsigmoid") == Gate.HARDSIGMOID == 1


def test_check_choice_names_the_argument():
    options.check_choice("pool", "max")
    with pytest.raises(ValueError, match="gate must be one of 'sigmoid', 'hardsigmoid', 'tanh', "
                                         "'relu', got 'softmax'"):
        options.check_choice("gate", "softmax")
    with pytest.raises(ValueError, match="activation must be one of"):
        options.check_choice("activation", 1)


@pytest.mark.parametrize("value, expected", [(None, "none"), ("none", "none"),
                                             ("identity", "none"), ("relu", "relu")])
def test_out_activation_spellings(value, expected):
    assert options.normalize_out_activation(value) == expected


@pytest.mark.parametrize("argument, modules, classes", [
    ("activation", options.ACTIVATION_MODULES, options.ACTIVATION_CLASSES),
    ("gate", options.GATE_MODULES, options.GATE_CLASSES)])
def test_modules_map_to_names_and_back(argument, modules, classes):
    """Every option value has a torch.nn module computing it, which the class tables map
    back to that value; the tables name nothing but option values."""
    assert tuple(modules) == options.NAMES[argument]
    for name, make in modules.items():
        assert options.module_option(make(), classes) == name
    names = [entry for entry in classes.values() if isinstance(entry, str)]
    assert set(names) <= set(options.NAMES[argument])


def test_gelu_option_follows_its_approximation():
    table = options.ACTIVATION_CLASSES
    assert options.module_option(nn.GELU(), table) == "gelu"
    assert options.module_option(nn.GELU(approximate="tanh"), table) == "gelu_tanh"
    assert options.module_option(nn.Tanh(), table) is None
    assert options.module_option(nn.Mish(), options.GATE_CLASSES) is None
    assert options.module_option(nn.LeakyReLU(), table) == "leaky_relu"
    assert options.module_option(nn.LeakyReLU(0.1), table) is None  # only the default slope


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


@pytest.mark.parametrize("enum, names", [("TraceKernel", schedule.CUDA_TRACE_KERNELS),
                                         ("TraceTensor", schedule.TRACE_TENSORS)])
def test_plan_trace_codes_agree_with_the_cuda_planner(enum, names):
    """The codes of the cuda schedule's trace (csrc/cuda/se_trace.h) index the names that
    se_kernels.plan decodes them with, in order."""
    text = (HEADER.parent / "cuda" / "se_trace.h").read_text()
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
