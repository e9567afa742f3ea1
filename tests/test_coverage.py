"""`se-kernels coverage`: timm's SE-style modules per family, served or with the reason."""

import pytest

from helpers import run_python
from se_kernels import coverage

pytest.importorskip("timm")


def test_families_are_counted_with_their_reasons():
    families = {f.family: f for f in coverage.scan("[rs]e[xn]*et", models_per_family=1)}
    # rexnet (BatchNorm between the FCs) stays eager; senet's legacy SE converts.
    assert {"rexnet", "senet"} <= set(families)
    rexnet, senet = families["rexnet"], families["senet"]
    assert rexnet.models == rexnet.models_with_se == 1 and rexnet.modules > 0
    assert rexnet.served == 0 and not rexnet.fully_served
    assert rexnet.eager == {("SEModule", "norm layer bn=BatchNorm2d between the FCs"): rexnet.modules}
    assert senet.modules > 0 and senet.fully_served and not senet.eager
    table = coverage.table(list(families.values()))
    assert "| rexnet | 1/1 |" in table and "norm layer bn=BatchNorm2d" in table
    served = sum(f.served for f in families.values() if f.modules)
    total = sum(f.modules for f in families.values())
    assert table.endswith(f"{served} of {total} modules.")


def test_models_served_through_new_activations_and_one_fc_reasons():
    families = {f.family: f for f in coverage.scan("[cg]*", models_per_family=1)}
    # gcvit's SE uses GELU, ghostnet's hardsigmoid with ReLU: all served.
    assert families["gcvit"].modules > 0 and families["gcvit"].fully_served
    assert families["ghostnet"].modules > 0 and families["ghostnet"].fully_served
    cspnext = families["cspnext"]
    assert cspnext.served == 0 and cspnext.modules > 0
    [(cls, reason)] = cspnext.eager
    assert cls == "EffectiveSEModule" and reason.startswith("one FC C -> C")


def test_cli_prints_the_table():
    result = run_python("-m", "se_kernels", "coverage", "--family", "senet",
                        "--models-per-family", "1")
    assert result.returncode == 0, result.stderr
    assert "| senet | 1/1 |" in result.stdout
    assert "1 of 1 families with SE-style modules fully served" in result.stdout


def test_cli_names_a_family_glob_that_matches_nothing():
    result = run_python("-m", "se_kernels", "coverage", "--family", "no-such-family")
    assert result.returncode == 2 and "no timm family matches 'no-such-family'" in result.stderr
