"""Every command of the README works on a fresh clone: run as written, from the clone's root
(with the fake server standing in for Ollama, and the files they write put in tmp_path)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from embed_helpers.constants import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
BLOCK = README.split("## Other ways to run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
COMMANDS = [line.split("  #")[0].strip() for line in BLOCK.strip().splitlines()
            if line.strip() and not line.startswith("cp ")]  # cp would write the clone's .env
BIN = Path(sys.executable).parent


def test_the_readme_has_commands_and_names_only_data_in_the_repo():
    assert len(COMMANDS) >= 8
    for path in re.findall(r"--data (\S+)", BLOCK):
        assert (PROJECT_ROOT / path).exists(), f"{path} is not in the repository"


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray", reason="Ray Data is not installed (requirements-ray.txt)")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100_000_000,
             log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.parametrize("command", COMMANDS)
def test_command_runs(command, tmp_path, fake_server, ray_address, fresh_database):
    argv = shlex.split(command)
    tool = Path(argv[0]).name  # .venv/bin/python, .venv/bin/papermill: this environment's
    argv[0] = sys.executable if tool == "python" else str(BIN / tool)
    outputs = {"out.ipynb", "team-cache.jsonl"}  # what the commands write, kept out of the clone
    argv = [str(tmp_path / a) if a in outputs else a for a in argv]
    env = dict(os.environ, EMBEDDING_BACKEND="ollama", OLLAMA_HOST=fake_server.url,
               EMBED_CACHE_PATH=str(tmp_path / "cache.jsonl"), RAY_ADDRESS=ray_address,
               DATABASE_URL=fresh_database,  # the default tables of the commands, of their own
               PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run(argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
