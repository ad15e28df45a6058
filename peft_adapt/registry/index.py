"""The registry's index: the same tables and statements in SQLite (embedded) or PostgreSQL (shared by a team).

Statements are written once, in the dialect both engines read (`?` placeholders, `ON CONFLICT` upserts); the
PostgreSQL connection rewrites the placeholders. Writers take turns the same way on both: a write transaction
starts by bumping the change counter, whose row lock (PostgreSQL) or `BEGIN IMMEDIATE` (SQLite) holds every other
writer until it commits, so `last_version + 1` is never read by two writers at once.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import ServiceUnavailable, UserInputError

TABLES = (
    "CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, last_version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS adapters (
        name TEXT NOT NULL, version INTEGER NOT NULL, domain TEXT, method TEXT, task TEXT,
        base_model TEXT, fingerprint TEXT, quantization TEXT, created TEXT, metrics TEXT, path TEXT NOT NULL,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS tags (name TEXT NOT NULL, tag TEXT NOT NULL, version INTEGER NOT NULL,
        PRIMARY KEY (name, tag))""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO meta (key, value) VALUES ('changes', 0) ON CONFLICT (key) DO NOTHING",
)
UNAVAILABLE = "the adapter registry is unavailable; try again shortly"
BUMP = "UPDATE meta SET value = value + 1 WHERE key = 'changes'"


def is_postgres_url(location) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


SECRET_PARAMETERS = ("password", "sslpassword", "sslkey", "passfile", "sslcert")  # libpq options naming secrets
_SECRET_PARAMETER = re.compile(r"(?i)(\b(?:%s)\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s#]*)" % "|".join(SECRET_PARAMETERS))


def redact(url: str) -> str:
    """A URL (or libpq connection string) as messages show it: its user info's password and every parameter libpq
    reads as a secret replaced by `***`. Read the way it could be misread: a password holding an unencoded `#`, `/`
    or `@` still ends at the last `@` before the host, so everything between the user name and it is hidden."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        credentials, _, after = rest.rpartition("@")
        user, colon, _ = credentials.partition(":")
        if colon or "/" in credentials or "?" in credentials or "#" in credentials:
            rest = f"{user.split('/')[0].split('?')[0]}:***@{after}"
        text = f"{scheme}{sep}{rest}"
    return _SECRET_PARAMETER.sub(lambda m: m.group(1) + "***", text)


def secrets_of(url: str) -> list[str]:
    """The secret substrings of a URL (its password, raw and %-decoded, and secret parameters' values), longest
    first: scrubbed from any message that might echo the URL (a driver's error text)."""
    from urllib.parse import unquote

    text, found = str(url), set()
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        credentials = rest.rpartition("@")[0]
        if ":" in credentials:
            found.add(credentials.partition(":")[2])
    found |= {m.group(2).strip("'") for m in _SECRET_PARAMETER.finditer(text)}
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if len(s) >= 3), key=len, reverse=True)


def scrub(message: str, url: str) -> str:
    """`message` with every secret of `url` replaced by `***`."""
    for secret in secrets_of(url):
        message = message.replace(secret, "***")
    return message


class SQLiteIndex:
    """`<root>/registry.db` in WAL mode; read-only roots are read through `mode=ro` (or `immutable=1`)."""

    engine = "sqlite"

    def __init__(self, db_path: Path, read_only: bool):
        self.db_path = db_path
        self.read_only = read_only
        self.where = str(db_path.parent)

    def create(self) -> None:
        with self.connect() as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"names", "adapters", "tags", "meta"} <= tables:  # opening an existing registry writes nothing
                db.execute("PRAGMA journal_mode=WAL")
                for statement in TABLES:
                    db.execute(statement)

    @contextmanager
    def connect(self):
        db = self._connect_read_only() if self.read_only else self._connect_writable()
        try:
            yield db
        finally:
            db.close()

    def _connect_writable(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=60000")
        return db

    def _connect_read_only(self) -> sqlite3.Connection:
        """`mode=ro` reads a live WAL database; where its -shm file cannot be made (a read-only mount of a registry
        nobody writes), `immutable=1` reads the file as it is."""
        uri = self.db_path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
        try:
            db.execute("SELECT 1 FROM meta LIMIT 1").fetchall()
            return db
        except sqlite3.OperationalError:
            db.close()
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)

    @contextmanager
    def transaction(self):
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(BUMP)
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


class _Postgres:
    """A psycopg connection that reads `?` placeholders, as sqlite3 does."""

    def __init__(self, connection):
        self.connection = connection

    def execute(self, sql: str, args=()):
        return self.connection.execute(sql.replace("?", "%s"), args)


class PostgresIndex:
    """The same tables in a PostgreSQL database (`postgresql://user@host/db`; libpq's PG* variables and
    ~/.pgpass fill in what the URL leaves out). One connection per thread, kept open: a connection costs a
    round trip and an authentication, a statement only a round trip."""

    engine = "postgresql"
    read_only = False

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise UserInputError("a PostgreSQL registry needs psycopg: pip install 'peft-adapt[team]'") from None
        self._psycopg = psycopg
        self.url = url
        self.where = redact(url)
        self._local = threading.local()

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and self._local.pid == os.getpid():
            return conn
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=30)
        except self._psycopg.OperationalError as exc:
            raise ServiceUnavailable(
                f"cannot reach the registry database {self.where}: {scrub(str(exc).strip(), self.url)}. Check the URL "
                f"and that the server runs (credentials come from the URL, PGPASSWORD or ~/.pgpass)",
                public=UNAVAILABLE) from None
        except self._psycopg.Error as exc:  # a URL libpq cannot read: its message may quote the URL
            raise UserInputError(f"the registry URL {self.where} is not one PostgreSQL reads: "
                                 f"{scrub(str(exc).strip(), self.url)}. %-encode special characters in the password "
                                 f"(# as %23, / as %2F, @ as %40)") from None
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def create(self) -> None:
        with self.transaction(bump=False) as db:
            db.execute("SELECT pg_advisory_xact_lock(7291)")  # two first openers must not both create the tables
            for statement in TABLES:
                db.execute(statement)

    @contextmanager
    def connect(self):
        conn = self._connection()
        try:
            yield _Postgres(conn)
        except self._psycopg.OperationalError as exc:
            conn.close()  # a broken connection is not kept for the next call
            raise ServiceUnavailable(
                f"the registry database {self.where} failed: {scrub(str(exc).strip(), self.url)}; nothing was changed "
                f"by this command's unfinished write. Check the server and try again", public=UNAVAILABLE) from None

    @contextmanager
    def transaction(self, bump: bool = True):
        with self.connect() as db:
            with db.connection.transaction():
                if bump:
                    db.execute(BUMP)  # the row lock every writer queues on, as at BEGIN IMMEDIATE
                yield db
