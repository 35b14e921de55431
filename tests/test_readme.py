"""The README's cross-framework example runs as written (issue #13)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_cross_framework_example_runs(capsys):
    text = README.read_text()
    section = text[text.index("## Cross-framework tests") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "leaf" in out and "0/kernel" in out and "2/kernel" in out
