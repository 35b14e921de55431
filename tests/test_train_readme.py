"""The README's N:M and training snippets run as written (issue #10)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(title, next_title):
    text = README.read_text()
    section = text[text.index(title) : text.index(next_title)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize(
    "title,next_title,n_blocks",
    [("## N:M sparsity", "## Structured pruning", 1), ("## Fine-tuning in a JAX", "## The main job", 2)],
)
def test_snippets_run(title, next_title, n_blocks, capsys):
    blocks = _blocks(title, next_title)
    assert len(blocks) == n_blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "2:4" in out and "global" in out
