"""The documents stay true to the code: the README fits a learner's reading, its copy of the step and of the
hyperparameter block is the script's, and every file it links to exists."""

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_readme_is_at_most_12000_bytes():
    assert len(README.encode()) <= 12_000


def test_the_readme_copies_cnn_py_line_for_line():
    """The step and the hyperparameter lines shown are lines of cnn.py, their comments aside."""
    source = (ROOT / "cnn.py").read_text().splitlines()
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    shown = [line for block in blocks for line in block.splitlines() if line.strip() and line.strip() != "..."]
    assert len(shown) >= 10
    code = {line.split("  # ")[0].rstrip() for line in source}
    for line in shown:
        assert line.split("  # ")[0].rstrip() in code, line


def test_every_relative_link_in_the_readme_and_docs_exists():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to {target}"
