"""Every Python snippet in GUIDE.md runs, so the guide cannot rot."""
import os
import re
import subprocess
import sys

import pytest

from embed_helpers.constants import PROJECT_ROOT

GUIDE = (PROJECT_ROOT / "GUIDE.md").read_text()
SNIPPETS = list(re.findall(r"^ *```python\n(.*?)^ *```", GUIDE, re.S | re.M))


def test_guide_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path):
    import textwrap
    code = textwrap.dedent(SNIPPETS[index])
    env_path = f"{PROJECT_ROOT}:{PROJECT_ROOT / 'tests'}"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path,
                                 "EMBED_CACHE_PATH": str(tmp_path / "cache.jsonl"),
                                 "EMBED_RUNS_DIR": str(tmp_path / "runs"), "EMBED_ENV_FILE": "",
                                 "DATABASE_URL": os.environ["DATABASE_URL"],
                                 "HOME": str(tmp_path)})
    assert result.returncode == 0, f"snippet {index} failed:\n{code}\n{result.stderr[-2000:]}"
