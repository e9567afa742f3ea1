"""The se-kernels command."""

from helpers import run_python


def test_info_reports_backends_and_build():
    result = run_python("-m", "se_kernels", "info")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("se_kernels ")
    assert "extension se_kernels._C: built against torch" in text
    assert "backends for cpu tensors (auto picks 'cpu' for a " in text
    assert "  cpu     usable" in text
    assert "  torch   usable" in text


def test_unknown_command_fails_with_usage():
    result = run_python("-m", "se_kernels", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
