"""`se-kernels coverage`: timm's SE-style modules per family, served or with the reason."""

import collections

import pytest

from helpers import run_python
from se_kernels import coverage

pytest.importorskip("timm")


def test_families_are_counted():
    families = {f.family: f for f in coverage.scan("[rs]e[xn]*et", models_per_family=1)}
    # rexnet (BatchNorm between the FCs) runs staged; senet's legacy SE fused.
    assert {"rexnet", "senet"} <= set(families)
    rexnet, senet = families["rexnet"], families["senet"]
    assert rexnet.models == rexnet.models_with_se == 1 and rexnet.modules > 0
    assert rexnet.fully_served and not rexnet.eager
    assert senet.modules > 0 and senet.fully_served and not senet.eager
    table = coverage.table(list(families.values()))
    assert "| rexnet | 1/1 |" in table
    served = sum(f.served for f in families.values() if f.modules)
    total = sum(f.modules for f in families.values())
    assert table.endswith(f"{served} of {total} modules.")


def test_one_fc_eca_and_new_activation_families_are_served():
    families = {f.family: f for f in coverage.scan("[cgh]*", models_per_family=1)}
    # gcvit's SE uses GELU, ghostnet's hardsigmoid with ReLU, cspnext and hgnet one FC.
    for name in ("gcvit", "ghostnet", "cspnext", "hgnet"):
        assert families[name].modules > 0 and families[name].fully_served, name


def test_modules_left_eager_are_listed_with_their_reason():
    family = coverage.FamilyCoverage("made-up", models=2, models_with_se=1, modules=3, served=1,
                                     eager=collections.Counter({("SqueezeExciteCl", "works on channels-last"): 2}))
    row = coverage.table([family]).splitlines()[2]
    assert row == "| made-up | 1/2 | 3 | 1 | 2: SqueezeExciteCl: works on channels-last |"


def test_cli_prints_the_table():
    result = run_python("-m", "se_kernels", "coverage", "--family", "senet",
                        "--models-per-family", "1")
    assert result.returncode == 0, result.stderr
    assert "| senet | 1/1 |" in result.stdout
    assert "1 of 1 families with SE-style modules fully served" in result.stdout


def test_cli_names_a_family_glob_that_matches_nothing():
    result = run_python("-m", "se_kernels", "coverage", "--family", "no-such-family")
    assert result.returncode == 2 and "no timm family matches 'no-such-family'" in result.stderr
