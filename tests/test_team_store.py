"""A team store: the DuckLake catalog in a real PostgreSQL (started here in a temp folder, on a Unix socket
only), two Ray workers committing shards of one run, readers attaching while a writer is attached.

Skipped with the reason where PostgreSQL's server binaries (``initdb``, ``pg_ctl``; Debian's ``postgresql``
package) or the ducklake extension are absent.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest

from gradsift.storage import lake as lakemod

try:
    lakemod.ducklake_extension()
except lakemod.LakeUnavailable as err:  # pragma: no cover - depends on the installed duckdb
    pytest.skip(f"the team store needs the ducklake extension: {err}", allow_module_level=True)

from lake_reader import lake_reader as connect_readonly  # noqa: E402
from lake_reader import query_readonly  # noqa: E402

from gradsift.storage.catalog import ReadOnlyQueryError  # noqa: E402
from gradsift.storage.lake import Lake  # noqa: E402


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    return None


@pytest.fixture(scope="module")
def pg_server():
    """A PostgreSQL server started for this module (socket in a temp folder, no TCP), stopped after it; yields a
    function that creates an empty database and returns its libpq DSN. As root the server runs as ``nobody``
    (PostgreSQL refuses to run as root)."""
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="gradsift-pg-"))  # not under pytest's root-only folder: `nobody` enters it
    as_user = None
    if os.geteuid() == 0:
        as_user = pwd.getpwnam("nobody")
        os.chown(folder, as_user.pw_uid, as_user.pw_gid)

    def run(*args: str) -> None:
        def demote() -> None:
            if as_user is not None:
                os.setgid(as_user.pw_gid)
                os.setuid(as_user.pw_uid)

        done = subprocess.run([str(bindir / args[0]), *args[1:]], capture_output=True, text=True, preexec_fn=demote)
        if done.returncode != 0:
            pytest.skip(f"cannot run PostgreSQL here ({args[0]}): {done.stderr.strip()[-400:]}")

    data = folder / "data"
    run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
    opts = f"-k {folder} -c listen_addresses='' -p 5433 -c fsync=off"
    run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(folder / "log"), "-w", "-t", "60", "start")
    made = iter(range(1_000))

    def database() -> str:
        name = f"lake{next(made)}"
        run("createdb", "-h", str(folder), "-p", "5433", "-U", "postgres", name)
        return f"dbname={name} host={folder} port=5433 user=postgres"

    try:
        yield database
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server) -> str:
    """An empty database of the module's PostgreSQL server."""
    return pg_server()


def scores(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table({"checkpoint": ["final"] * n, "dataset": ["d"] * n, "sample_id": ids, "loss": [1.0] * n})


def test_postgres_catalog(tmp_path, pg_dsn):
    root = tmp_path / "store"
    with Lake(root, pg_dsn) as lk:
        ids = [f"s{i:04d}" for i in range(100)]
        for night_no in range(3):
            lk.commit_run(f"r{night_no:03d}", {"scores": scores(ids)}, run={"status": "completed"}, score_key="k")
        con = connect_readonly(root, pg_dsn)  # another attach while the writer is attached
        try:
            assert query_readonly(con, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 100}]
            runs = query_readonly(con, "SELECT run_id, snapshot_id FROM runs ORDER BY run_id").to_pylist()
            assert [r["run_id"] for r in runs] == ["r000", "r001", "r002"] and all(r["snapshot_id"] for r in runs)
            with pytest.raises(ReadOnlyQueryError):
                query_readonly(con, "SELECT * FROM postgres_query('__ducklake_metadata_lake', 'SELECT 1 AS x')")
        finally:
            con.close()


def test_two_ray_workers_write_shards_of_one_run(tmp_path, pg_dsn, ray_local):
    ray = ray_local
    root = str(tmp_path / "team")
    with Lake(root, pg_dsn):  # create the tables once, before the workers race for it
        pass
    shards = [[f"t{i:05d}" for i in range(k, 4000, 2)] for k in range(2)]

    def write_shard(root: str, dsn: str, run_id: str, ids: list[str]) -> int:
        """A Ray worker's part of the run: its own attach of the shared catalog, one transaction for its shard
        (defined here so Ray ships it by value: the workers cannot import test modules)."""
        from gradsift.storage.lake import Lake

        n = len(ids)
        shard = pa.table({"checkpoint": ["final"] * n, "dataset": ["d"] * n, "sample_id": ids, "loss": [1.0] * n})
        with Lake(root, dsn) as lk:
            return lk.commit_shard(run_id, {"scores": shard}, score_key="team")["scores"]

    write = ray.remote(num_cpus=1)(write_shard)
    written = ray.get([write.remote(root, pg_dsn, "team-run", ids) for ids in shards])
    assert written == [2000, 2000]
    with Lake(root, pg_dsn) as lk:
        lk.commit_run("team-run", {}, run={"status": "completed"})
        assert lk.commit_shard("team-run", {"scores": scores(shards[0])}, score_key="team") == {"scores": 0}
    con = connect_readonly(root, pg_dsn)
    try:
        got = query_readonly(
            con, "SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM scores WHERE score_key = 'team'"
        )
        assert got.to_pylist() == [{"n": 4000, "d": 4000}]
        runs = query_readonly(con, "SELECT status, snapshot_id FROM runs WHERE run_id = 'team-run'").to_pylist()
        assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["snapshot_id"]
    finally:
        con.close()
