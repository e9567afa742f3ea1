"""DESIGN.md is in the repository, and every section the code cites exists."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sections() -> set[str]:
    """Section numbers of DESIGN.md's headings: "## 2. ..." -> "2", "### 3.1 ..." -> "3.1"."""
    text = (ROOT / "DESIGN.md").read_text()
    return {m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE)}


def citing_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout: every source file below the root
        return [p for p in ROOT.rglob("*") if p.suffix in (".py", ".h", ".cpp", ".cu", ".cuh")]
    return [ROOT / name for name in listed.stdout.split()
            if name.endswith((".py", ".h", ".cpp", ".cu", ".cuh", ".md"))]


def test_cited_sections_exist():
    known = sections()
    assert {"1", "1.3", "2", "3.1", "3.2", "4", "5"} <= known, known
    cited = []
    for path in citing_files():
        if not path.is_file() or path.name == "DESIGN.md":
            continue
        for m in re.finditer(r"DESIGN\.md(?:,? (?:§|section )(\d+(?:\.\d+)?))?", path.read_text()):
            cited.append((path.relative_to(ROOT), m.group(1)))
    assert cited, "nothing cites DESIGN.md"
    missing = [(str(path), number) for path, number in cited if number and number not in known]
    assert not missing, missing
