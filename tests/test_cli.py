"""The se-kernels command."""

import subprocess
import sys


def test_info_reports_backends_and_build():
    result = subprocess.run([sys.executable, "-m", "se_kernels", "info"], capture_output=True,
                            text=True, check=True)
    text = result.stdout
    assert text.startswith("se_kernels ")
    assert "extension se_kernels._C: built against torch" in text
    assert "backends for cpu tensors (auto picks 'cpu')" in text
    assert "  cpu     usable" in text
    assert "  torch   usable" in text


def test_unknown_command_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "se_kernels", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
