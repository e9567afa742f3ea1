"""restore_se_modules, the inverse of convert_se_modules: the original torchvision and timm
modules come back with the same parameter tensors and state_dict, and the model then runs
where se_kernels is not installed."""

import copy
import pickle

import pytest
import torch
from torch import nn

import se_kernels
from helpers import image, run_python
from se_kernels.convert import ConvertedSqueezeExcitation, convert_se_modules, restore_se_modules
from test_convert import MODEL_IDS, MODELS, build, qualified_name, se_variants, served_se_modules

# Whole models: one thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def module_classes(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, qualified_name(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("library, name, source, count", MODELS, ids=MODEL_IDS)
def test_restore_undoes_the_conversion(library, name, source, count):
    model = build(library, name)
    classes, parameters = module_classes(model), [id(p) for p in model.parameters()]
    x = image(n=1, size=32)
    with torch.no_grad():
        expected = model(x)
    converted = convert_se_modules(model)
    assert len(served_se_modules(converted)) == count
    with torch.no_grad():  # trained values, set through the converted model, survive
        for p in converted.parameters():
            p.mul_(0.5)
    state = {key: value.clone() for key, value in converted.state_dict().items()}
    restored = restore_se_modules(converted)
    assert restored is model
    assert module_classes(restored) == classes
    assert [id(p) for p in restored.parameters()] == parameters
    assert restored.state_dict().keys() == state.keys()
    assert all(torch.equal(restored.state_dict()[key], value) for key, value in state.items())
    with torch.no_grad():
        for p in restored.parameters():
            p.mul_(2)
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(se_variants()))
def test_restore_of_every_served_variant(variant):
    make, _ = se_variants()[variant]
    original = make().train(False)
    converted = convert_se_modules(original)  # the root itself: a new module comes back
    assert isinstance(converted, ConvertedSqueezeExcitation)
    converted.train()
    restored = restore_se_modules(converted)
    assert restored is original and restored.training
    assert module_classes(restored) == module_classes(make())
    assert [id(p) for p in restored.parameters()] == [id(p) for p in converted.parameters()]


def test_restore_keeps_shared_modules_shared_and_leaves_own_modules():
    shared = torchvision_se()
    model = nn.Sequential(shared, nn.Sequential(shared), se_kernels.SqueezeExcitation(8, 2))
    convert_se_modules(model)
    assert model[0] is model[1][0] and isinstance(model[0], ConvertedSqueezeExcitation)
    restore_se_modules(model)
    assert model[0] is model[1][0] is shared
    assert type(model[2]) is se_kernels.SqueezeExcitation


def torchvision_se():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.ops.SqueezeExcitation(8, 2)


def test_restore_of_a_model_converted_twice_and_pickled():
    model = nn.Sequential(torchvision_se())
    convert_se_modules(model)
    convert_se_modules(model)  # nothing more to convert
    state = model.state_dict()
    model = pickle.loads(pickle.dumps(model))
    restore_se_modules(model)
    assert qualified_name(model[0]) == "torchvision.ops.misc.SqueezeExcitation"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    x = torch.randn(2, 8, 3, 3)
    fc1, fc2 = model[0].fc1, model[0].fc2
    expected = x * torch.sigmoid(fc2(torch.relu(fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(model(x), expected)


def test_restore_without_the_original_is_a_clear_error():
    converted = convert_se_modules(torchvision_se())
    del converted.__dict__["original"]  # as a module unpickled from before originals were kept
    with pytest.raises(ValueError, match="holds no original module"):
        restore_se_modules(nn.Sequential(converted))


def test_restored_model_runs_without_se_kernels(tmp_path):
    model = convert_se_modules(build("timm", "legacy_seresnet18"))
    x = image(n=1, size=32)
    with torch.no_grad():
        expected = model(x)
    torch.save({"model": restore_se_modules(copy.deepcopy(model)), "x": x, "expected": expected},
               tmp_path / "model.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['se_kernels'] = None  # import se_kernels now fails\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(saved['model'](saved['x']), saved['expected'])\n"
        "assert not any(name.startswith('se_kernels') for name in sys.modules if sys.modules[name])\n"
        "print('ran without se_kernels')\n")
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert "ran without se_kernels" in result.stdout
