"""A PgBouncer for the soaks: started on a free port with a generated config, then stopped.

    with PgBouncer(postgres_url, workdir, pool_size=10) as bouncer:
        bouncer.url            # what the app connects to (postgresql+psycopg://...)
        bouncer.show("POOLS")  # the admin console, as a list of dicts
        bouncer.pause(); bouncer.resume()

Settings, and why (deploy/README.md, "PgBouncer in transaction mode"):

* ``pool_mode = transaction``: a server connection belongs to a client for one
  transaction only. greenscope's request-end removal is what makes that safe: no Session
  keeps a transaction open across requests.
* The server side uses its own role (``greenscope_pgbouncer``), created if missing, so
  that the soak can tell PgBouncer's backends from everything else in
  ``pg_stat_activity``. The role carries ``client_connection_check_interval``: PgBouncer
  refuses the ``options`` startup parameter that the direct demo uses for it.
* ``query_wait_timeout``: how long a client's query may wait for a server connection
  (while PgBouncer is ``PAUSE``d, or its pool is exhausted) before PgBouncer fails it.
  The demo's own deadline is shorter; this is the backstop.
* ``server_login_retry = 1`` (default 15 s): after one failed server login (PostgreSQL
  restarting, or at ``max_connections``) PgBouncer fails *every* client for this long
  without trying again. Seen here: a soak whose PostgreSQL was briefly at its limit
  answered 503 for 6.5 s after the database was back.
* PgBouncer refuses to run as root: ``-u nobody``, with its files owned by nobody.

Debian's PgBouncer 1.18 is what this was written against; ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

ROLE = "greenscope_pgbouncer"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def available() -> str | None:
    """The pgbouncer binary, or None."""
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )


def ensure_role(postgres_url: str) -> None:
    """The server-side role PgBouncer logs in as (a superuser: the soak's tables are
    created by another role), with the settings the demo cannot pass through PgBouncer."""
    admin = create_engine(postgres_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.scalar(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE})
        if not exists:
            conn.execute(text(f"CREATE ROLE {ROLE} LOGIN SUPERUSER"))
        conn.execute(text(f"ALTER ROLE {ROLE} SET client_connection_check_interval = '250ms'"))
    admin.dispose()


class PgBouncer:
    """One PgBouncer process in front of ``postgres_url``'s server (transaction mode)."""

    def __init__(
        self,
        postgres_url: str,
        workdir: str,
        *,
        pool_size: int = 10,
        listen: tuple[str, ...] = ("127.0.0.1",),
        query_wait_timeout: int = 10,
        max_client_conn: int = 1000,
    ) -> None:
        binary = available()
        if binary is None:
            raise RuntimeError(
                "pgbouncer is not installed: apt-get install -y pgbouncer (Debian's 1.18)"
            )
        self.binary = binary
        self.server = make_url(postgres_url)
        self.pool_size = pool_size
        self.listen = listen
        self.port = free_port()
        self.dir = Path(workdir) / f"pgbouncer-{self.port}"
        self.dir.mkdir(parents=True)
        self.database = self.server.database or "postgres"
        self.query_wait_timeout = query_wait_timeout
        self.max_client_conn = max_client_conn
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The app's URL: the same database, through PgBouncer (as user postgres)."""
        return f"postgresql+psycopg://postgres@{self.listen[0]}:{self.port}/{self.database}"

    def _config(self) -> str:
        host = self.server.host or "127.0.0.1"
        port = self.server.port or 5432
        return f"""
[databases]
{self.database} = host={host} port={port} dbname={self.database} user={ROLE}

[pgbouncer]
listen_addr = {",".join(self.listen)}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "users.txt"}
admin_users = postgres
stats_users = postgres
pool_mode = transaction
default_pool_size = {self.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {self.max_client_conn}
max_db_connections = {self.pool_size}
server_reset_query =
server_check_delay = 1
server_login_retry = 1
query_wait_timeout = {self.query_wait_timeout}
ignore_startup_parameters = extra_float_digits
application_name_add_host = 0
logfile = {self.dir / "pgbouncer.log"}
pidfile = {self.dir / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 1
"""

    def start(self) -> PgBouncer:
        ensure_role(self.server.render_as_string(hide_password=False))
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        config = self.dir / "pgbouncer.ini"
        config.write_text(self._config())
        nobody = pwd.getpwnam("nobody")
        os.chmod(self.dir.parent, 0o755)
        for path in (self.dir, *self.dir.iterdir()):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        out = open(self.dir / "stdout.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.binary, "-u", "nobody", str(config)], stdout=out, stderr=out
        )
        self._out = out
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.show("VERSION")
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not answer:\n{self.log()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._out.close()

    def log(self) -> str:
        parts = []
        for name in ("stdout.log", "pgbouncer.log"):
            path = self.dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the admin console ----------------------------------------------------------

    def _console(self) -> Any:
        import psycopg  # noqa: PLC0415 - the soaks' driver

        return psycopg.connect(
            host=self.listen[0],
            port=self.port,
            dbname="pgbouncer",
            user="postgres",
            autocommit=True,  # the console has no transactions
            prepare_threshold=None,
            connect_timeout=5,
        )

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console, as dicts."""
        with self._console() as conn, conn.cursor() as cur:
            cur.execute(f"SHOW {what}")
            if cur.description is None:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def command(self, sql: str) -> None:
        with self._console() as conn:
            conn.execute(sql)

    def pause(self) -> None:
        """The database goes away, as far as clients can tell: PgBouncer waits for the
        transactions in flight, then holds every new query until :meth:`resume`."""
        self.command(f"PAUSE {self.database}")

    def resume(self) -> None:
        self.command(f"RESUME {self.database}")

    def pool(self) -> dict[str, Any]:
        """This database's row of ``SHOW POOLS``."""
        for row in self.show("POOLS"):
            if row.get("database") == self.database:
                return row
        return {}
