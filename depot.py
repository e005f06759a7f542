"""Depot: an artifact repository manager in one Python module.

Copy this file to a host and run ``python depot.py``. Depot then serves:

* a management REST API under ``/api/v1`` on its main HTTPS port, with a
  self-signed certificate it makes on first start;
* ``raw`` repositories: any file under ``/repository/<name>/<path>``;
* ``docker`` repositories: Docker Registry HTTP API V2 / OCI distribution-spec
  v1.1 registries, each on its own ports (or one of them at ``/v2/`` on the
  main port).

Everything lives in one SQLite database, opened through apsw. File and blob
content is stored once per digest, in chunks, so identical layers and files
cost their space once.

The module reads from top to bottom in the order data flows through Depot:
settings, errors, storage, request bodies and content responses, the registry
protocol, raw files, the management API, servers, TLS and the command line.
"""

import argparse
import collections
import contextlib
import ctypes
import datetime
import email.utils
import errno
import fcntl
import hashlib
import html
import ipaddress
import json
import logging
import mimetypes
import os
import queue
import re
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import uuid

import apsw
import bottle
import cheroot.errors
import cheroot.server
import cheroot.wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

__version__ = "0.1.0"

log = logging.getLogger("depot")
access_log = logging.getLogger("depot.access")


###############################################################################
# Settings ####################################################################
###############################################################################

#: Bytes of content per stored chunk; a chunk is one row and one transaction.
CHUNK_SIZE = 1024 * 1024

#: Bytes asked of the socket per read while a body streams in.
READ_SIZE = 64 * 1024

#: Largest manifest accepted; the OCI distribution-spec asks for at least 4 MiB.
MANIFEST_LIMIT = 4 * 1024 * 1024

#: Bytes of a chunked body read and dropped after an error, to keep the
#: connection usable; a longer body closes the connection instead.
DISCARD_LIMIT = 4 * 1024 * 1024

#: Largest JSON body accepted by the management API.
API_BODY_LIMIT = 1024 * 1024

#: Longest raw file path, in characters.
RAW_PATH_LIMIT = 1024

#: Seconds between two runs of the janitor (upload expiry, freeing space).
JANITOR_INTERVAL = 60

#: Milliseconds a database connection waits for a lock before giving up.
BUSY_TIMEOUT_MS = 60_000

#: Largest number of SQLite connections open at once.
POOL_SIZE = 16

#: KiB of page cache per SQLite connection.
CACHE_KIB = 2048

#: SQLite's ``synchronous`` per durability setting: for the writes of a
#: body's chunks, and for the commits that acknowledge a change to a client.
#: In rollback-journal mode NORMAL already flushes journal and database
#: before a commit returns; FULL flushes the journal's header once more.
DURABILITY = {"fast": ("OFF", "NORMAL"), "safe": ("NORMAL", "FULL")}

SETTINGS = (
    # (name, flag type, default, help)
    ("host", str, "0.0.0.0", "address to listen on"),
    ("port", int, 8443, "main HTTPS port (management API, raw files)"),
    ("data_dir", str, None, "data directory (default: %(default_dir)s)"),
    ("db_path", str, None, "SQLite database file (default: DATA_DIR/depot.db)"),
    ("cert_file", str, None,
     "TLS certificate, PEM (default: DATA_DIR/cert.pem, made on first start)"),
    ("key_file", str, None, "TLS private key, PEM (default: DATA_DIR/key.pem)"),
    ("log_level", str, "info", "debug, info, warning or error"),
    ("threads", int, 16, "worker threads per server"),
    ("upload_expiry", int, 24 * 3600,
     "seconds after which an idle registry upload session is removed"),
    ("durability", str, "fast",
     "fast: chunk writes are not flushed one by one (safe against crashes of "
     "Depot; what was acknowledged is on disk); safe: every chunk write is "
     "flushed too (also safe against power loss in mid-upload, slower)"),
)


def default_data_dir():
    """Where Depot keeps its data when no directory is configured."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "depot")


class Settings:
    """Depot's settings, from flags first, then DEPOT_* variables, then defaults."""

    def __init__(self, **values):
        for name, _kind, default, _help in SETTINGS:
            setattr(self, name, values.get(name, default))
        self.data_dir = os.path.abspath(self.data_dir or default_data_dir())
        self.db_path = os.path.abspath(
            self.db_path or os.path.join(self.data_dir, "depot.db"))
        self.cert_file = self.cert_file and os.path.abspath(self.cert_file)
        self.key_file = self.key_file and os.path.abspath(self.key_file)

    @classmethod
    def from_command_line(cls, argv=None, environ=os.environ):
        parser = argparse.ArgumentParser(
            prog="depot.py",
            description="Depot: raw file and docker registry repositories "
                        "in one SQLite database.",
            epilog="Every flag can also be set by an environment variable "
                   "named DEPOT_ and the flag in upper case, e.g. DEPOT_PORT; "
                   "a flag wins over its variable.")
        for name, kind, default, text in SETTINGS:
            variable = "DEPOT_" + name.upper()
            shown = "" if default is None else "; default %s" % default
            parser.add_argument(
                "--" + name.replace("_", "-"), type=kind, default=None,
                metavar=variable.removeprefix("DEPOT_"),
                help="%s [%s%s]" % (text % {"default_dir": default_data_dir()},
                                     variable, shown))
        parser.add_argument("--version", action="version", version=__version__)
        arguments = parser.parse_args(argv)
        values = {}
        for name, kind, _default, _text in SETTINGS:
            value = getattr(arguments, name)
            variable = "DEPOT_" + name.upper()
            if value is None and environ.get(variable):
                try:
                    value = kind(environ[variable])
                except ValueError:
                    parser.error("%s=%r is not a valid %s"
                                 % (variable, environ[variable], kind.__name__))
            if value is not None:
                values[name] = value
        settings = cls(**values)
        if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            parser.error("log level must be debug, info, warning or error")
        if not 0 < settings.port < 65536:
            parser.error("port must be between 1 and 65535")
        if settings.durability not in DURABILITY:
            parser.error("durability must be fast or safe")
        if settings.threads < 1 or settings.upload_expiry < 1:
            parser.error("threads and upload expiry must be positive")
        return settings


###############################################################################
# Errors ######################################################################
###############################################################################

class RegistryError(Exception):
    """An error on a registry port, rendered as the distribution-spec JSON body.

    ``code`` is one of the spec's error codes (``BLOB_UNKNOWN``,
    ``DIGEST_INVALID``, ...); ``status`` the HTTP status that goes with it.
    """

    def __init__(self, code, status, message, detail=None, headers=None):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message
        self.detail, self.headers = detail, headers or {}

    def body(self):
        error = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]})


class ApiError(Exception):
    """An error of the management API and raw files: ``{"error": "..."}``."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def body(self):
        return json.dumps({"error": self.message})


class StorageFull(Exception):
    """The disk or the database has no room for what is being written."""


class BadBody(Exception):
    """A request body that broke off, lied about its length or is malformed."""


def storage_failure(error):
    """Turn a low-level exception into StorageFull when it means a full disk."""
    if isinstance(error, apsw.FullError):
        return StorageFull("the storage is full")
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("the storage is full")
    return None


###############################################################################
# Storage #####################################################################
###############################################################################
#
# One SQLite database holds everything. Content (file bodies and blobs) lives
# in ``content`` rows, one per digest, whose bytes are ``chunk`` rows of at
# most CHUNK_SIZE bytes keyed by their start offset, so a Range read finds its
# chunk through an index and a gigabyte layer never becomes one value.
#
# A body is written chunk by chunk, each chunk in its own short transaction,
# into a content row whose digest is still NULL. Only the last step, a small
# transaction, gives the content its digest (or, when that digest is already
# stored, drops the new copy) and links it where it belongs. A crash at any
# moment therefore leaves either the whole upload or nothing visible; what it
# leaves behind is unreferenced and freed by the garbage collector.
#
# The database uses a rollback journal, not WAL: the chunks of a body go to
# pages appended to the file, which a rollback journal need not copy, so every
# byte is written once (WAL writes it twice: to the log, then at checkpoint).
# By default chunk commits are not flushed one by one (``synchronous=OFF``,
# safe against any crash of the process); the commit that acknowledges an
# upload is flushed with everything before it (see DURABILITY).
#
# Content that nothing references (no raw file, no linked blob, no upload
# session) is garbage. The collector first clears its digest, so nothing can
# link it again, then deletes its chunks. Readers and writers in this process
# pin the content they stream; pinned content keeps its chunks until unpinned.

MIGRATIONS = (
    # 1: the first schema.
    """
    CREATE TABLE repository (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        type        TEXT NOT NULL,
        description TEXT NOT NULL,
        config      TEXT NOT NULL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );

    CREATE TABLE content (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        digest      TEXT UNIQUE,
        size        INTEGER NOT NULL,
        created_at  REAL NOT NULL
    );

    CREATE TABLE chunk (
        id          INTEGER PRIMARY KEY,
        content_id  INTEGER NOT NULL,
        start       INTEGER NOT NULL,
        data        BLOB NOT NULL,
        UNIQUE (content_id, start)
    );

    CREATE TABLE raw_file (
        repository_id INTEGER NOT NULL
                      REFERENCES repository (id) ON DELETE CASCADE,
        path          TEXT NOT NULL,
        content_id    INTEGER NOT NULL REFERENCES content (id),
        media_type    TEXT NOT NULL,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        PRIMARY KEY (repository_id, path)
    ) WITHOUT ROWID;
    CREATE INDEX raw_file_content ON raw_file (content_id);

    CREATE TABLE blob (
        repository_id INTEGER NOT NULL
                      REFERENCES repository (id) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        content_id    INTEGER NOT NULL REFERENCES content (id),
        created_at    REAL NOT NULL,
        PRIMARY KEY (repository_id, name, content_id)
    ) WITHOUT ROWID;
    CREATE INDEX blob_content ON blob (content_id);

    CREATE TABLE manifest (
        id            INTEGER PRIMARY KEY,
        repository_id INTEGER NOT NULL
                      REFERENCES repository (id) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        digest        TEXT NOT NULL,
        media_type    TEXT NOT NULL,
        artifact_type TEXT,
        subject       TEXT,
        data          BLOB NOT NULL,
        created_at    REAL NOT NULL,
        UNIQUE (repository_id, name, digest)
    );
    CREATE INDEX manifest_subject ON manifest (repository_id, name, subject)
        WHERE subject IS NOT NULL;

    CREATE TABLE tag (
        repository_id INTEGER NOT NULL
                      REFERENCES repository (id) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        tag           TEXT NOT NULL,
        digest        TEXT NOT NULL,
        updated_at    REAL NOT NULL,
        PRIMARY KEY (repository_id, name, tag)
    ) WITHOUT ROWID;
    CREATE INDEX tag_digest ON tag (repository_id, name, digest);

    CREATE TABLE upload (
        id            TEXT PRIMARY KEY,
        repository_id INTEGER NOT NULL
                      REFERENCES repository (id) ON DELETE CASCADE,
        name          TEXT NOT NULL,
        content_id    INTEGER NOT NULL REFERENCES content (id),
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL
    );
    CREATE INDEX upload_content ON upload (content_id);
    """,
)

UNREFERENCED = """
    NOT EXISTS (SELECT 1 FROM raw_file WHERE content_id = content.id)
    AND NOT EXISTS (SELECT 1 FROM blob WHERE content_id = content.id)
    AND NOT EXISTS (SELECT 1 FROM upload WHERE content_id = content.id)
"""


class Store:
    """The SQLite database: a pool of apsw connections and short transactions.

    ``read()`` gives a connection inside a deferred transaction; ``write()``
    one inside ``BEGIN IMMEDIATE``, taken one at a time in this process so
    that writers queue here instead of failing with SQLITE_BUSY.
    """

    def __init__(self, path, durability="fast"):
        self.path = path
        self.synchronous, self.durable_synchronous = DURABILITY[durability]
        self._pool = []
        self._open = 0
        self._pool_ready = threading.Condition()
        self._write_lock = threading.Lock()
        self._pins = collections.Counter()
        self._pins_lock = threading.Lock()
        self.garbage = threading.Event()
        connection = self._connect(first=True)
        self._migrate(connection)
        self._pool.append(connection)
        self._open = 1

    # Connections ---------------------------------------------------------

    def _connect(self, first=False):
        connection = apsw.Connection(self.path)
        connection.setbusytimeout(BUSY_TIMEOUT_MS)
        if first:
            # Page size only takes effect before the first table exists.
            connection.execute("PRAGMA page_size = 65536")
            connection.execute("PRAGMA journal_mode = PERSIST")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = %s" % self.synchronous)
        # Chunk pages pass through once; another connection's write empties
        # this cache anyway (rollback journal), so a small one does.
        connection.execute("PRAGMA cache_size = -%d" % CACHE_KIB)
        return connection

    def _migrate(self, connection):
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise SystemExit(
                "the database %s was written by a newer Depot (schema %d; this "
                "Depot knows %d)" % (self.path, version, len(MIGRATIONS)))
        for number, script in enumerate(MIGRATIONS[version:], version + 1):
            with connection:
                connection.execute(script)
                connection.execute("PRAGMA user_version = %d" % number)
            log.info("database schema migrated to version %d", number)

    @contextlib.contextmanager
    def _connection(self):
        with self._pool_ready:
            while not self._pool and self._open >= POOL_SIZE:
                self._pool_ready.wait()
            if self._pool:
                connection = self._pool.pop()
            else:
                self._open += 1
                connection = None
        if connection is None:
            try:
                connection = self._connect()
            except BaseException:
                with self._pool_ready:
                    self._open -= 1
                    self._pool_ready.notify()
                raise
        try:
            yield connection
        finally:
            with self._pool_ready:
                self._pool.append(connection)
                self._pool_ready.notify()

    @contextlib.contextmanager
    def read(self):
        """A connection inside a read transaction (one consistent snapshot)."""
        with self._connection() as connection:
            connection.execute("BEGIN")
            try:
                yield connection
            finally:
                connection.execute("COMMIT")

    @contextlib.contextmanager
    def write(self, durable=False):
        """A connection inside a write transaction, committed on success.

        ``durable`` makes the commit wait for the disk: used for every step
        that a client is told has succeeded.
        """
        with self._write_lock, self._connection() as connection:
            if durable:
                connection.execute("PRAGMA synchronous = %s"
                                   % self.durable_synchronous)
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                    connection.execute("COMMIT")
                except BaseException:
                    if not connection.getautocommit():
                        connection.execute("ROLLBACK")
                    raise
            except (apsw.FullError, OSError) as error:
                full = storage_failure(error)
                if full is None:
                    raise
                raise full from error
            finally:
                if durable:
                    connection.execute("PRAGMA synchronous = %s"
                                       % self.synchronous)

    def healthy(self):
        """True when the database answers a query."""
        try:
            with self.read() as db:
                db.execute("SELECT count(*) FROM repository").fetchone()
            return True
        except apsw.Error:
            return False

    def close(self):
        with self._pool_ready:
            for connection in self._pool:
                connection.close()
            self._pool.clear()

    # Content ---------------------------------------------------------------

    def has_repository(self, db, repository_id):
        """True while the repository exists (it may be deleted mid-upload)."""
        return db.execute("SELECT 1 FROM repository WHERE id = ?",
                          (repository_id,)).fetchone() is not None

    def new_content(self, db):
        """Insert an empty content row, still without digest; returns its id."""
        db.execute("INSERT INTO content (digest, size, created_at) "
                   "VALUES (NULL, 0, ?)", (time.time(),))
        return db.last_insert_rowid()

    def pin(self, content_id, only_if_free=False):
        """Hold the chunks of ``content_id`` until the Pin is released.

        With ``only_if_free`` (the garbage collector's way) nothing is held
        and None returned when someone else holds the content already.
        """
        with self._pins_lock:
            if only_if_free and self._pins[content_id]:
                return None
            self._pins[content_id] += 1
        return Pin(self, content_id)

    def unpin(self, content_id):
        with self._pins_lock:
            self._pins[content_id] -= 1
            if not self._pins[content_id]:
                del self._pins[content_id]

    def is_live(self, content_id):
        """True while the content has its digest (it has not been collected)."""
        with self.read() as db:
            row = db.execute("SELECT digest FROM content WHERE id = ?",
                             (content_id,)).fetchone()
        return row is not None and row[0] is not None

    def finish_content(self, db, content_id, digest):
        """Give a fully written content its digest, inside a write transaction.

        Returns the id under which the bytes are stored from now on: when
        ``digest`` is already stored, that copy, and the new one is left to
        the garbage collector.
        """
        row = db.execute("SELECT id FROM content WHERE digest = ?",
                         (digest,)).fetchone()
        if row is not None and row[0] != content_id:
            self.garbage.set()
            return row[0]
        db.execute("UPDATE content SET digest = ? WHERE id = ?",
                   (digest, content_id))
        return content_id

    def chunks(self, content_id, start, end):
        """Yield the bytes ``start`` to ``end`` (exclusive) of a content.

        Each chunk is read in its own short read transaction, so a long
        download holds no lock between chunks.
        """
        position = start
        chunk = None
        while position < end:
            with self.read() as db:
                if chunk is not None and chunk[1] + chunk[2] == position:
                    chunk = db.execute(
                        "SELECT id, start, length(data) FROM chunk "
                        "WHERE content_id = ? AND start = ?",
                        (content_id, position)).fetchone()
                else:
                    chunk = db.execute(
                        "SELECT id, start, length(data) FROM chunk "
                        "WHERE content_id = ? AND start <= ? "
                        "ORDER BY start DESC LIMIT 1",
                        (content_id, position)).fetchone()
                if chunk is None or chunk[1] + chunk[2] <= position:
                    raise RuntimeError("content %d has no bytes at offset %d"
                                       % (content_id, position))
                rowid, chunk_start, length = chunk
                count = min(chunk_start + length, end) - position
                with db.blobopen("main", "chunk", "data", rowid, False) as blob:
                    blob.seek(position - chunk_start)
                    data = blob.read(count)
            yield data
            position += len(data)

    # Garbage ---------------------------------------------------------------

    def collect_garbage(self):
        """Free the chunks of content that nothing references any more.

        Returns the number of content rows removed.
        """
        with self.write() as db:
            db.execute("UPDATE content SET digest = NULL "
                       "WHERE digest IS NOT NULL AND " + UNREFERENCED)
            dead = [row[0] for row in db.execute(
                "SELECT id FROM content WHERE digest IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM upload WHERE content_id = content.id)")]
        removed = 0
        for content_id in dead:
            # A reader that pins after this sees the cleared digest and lets
            # go (pin_live): the chunks are the collector's.
            pin = self.pin(content_id, only_if_free=True)
            if pin is None:
                continue
            with pin:
                self._delete_content(content_id)
            removed += 1
        return removed

    def _delete_content(self, content_id):
        """Delete a dead content's chunks a batch at a time, then its row.

        Each batch checks again that the content is dead: an upload listed
        as garbage may have been finished (given its digest, linked) since.
        """
        while True:
            with self.write() as db:
                dead = db.execute(
                    "SELECT 1 FROM content WHERE id = ? AND digest IS NULL "
                    "AND " + UNREFERENCED, (content_id,)).fetchone()
                if dead is None:
                    return
                db.execute(
                    "DELETE FROM chunk WHERE id IN (SELECT id FROM chunk "
                    "WHERE content_id = ? LIMIT 64)", (content_id,))
                if db.changes() == 0:
                    db.execute("DELETE FROM content WHERE id = ? AND "
                               "digest IS NULL AND " + UNREFERENCED,
                               (content_id,))
                    return

    def pin_live(self, content_id):
        """Pin a content for reading; None when it has been collected.

        The caller found ``content_id`` through a reference that may have gone
        since; checking the digest after pinning closes that gap.
        """
        pin = self.pin(content_id)
        if self.is_live(content_id):
            return pin
        pin.release()
        return None


class Pin:
    """A hold on a content's chunks; the garbage collector leaves them be."""

    def __init__(self, store, content_id):
        self.store, self.content_id, self.held = store, content_id, True

    def release(self):
        if self.held:
            self.held = False
            self.store.unpin(self.content_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


class ContentWriter:
    """Streams bytes into the chunks of one content row, hashing on the way.

    The request's thread reads and hashes; from the second full chunk on,
    chunks go through a short queue to a storing thread, so that hashing and
    SQLite's writes run on two cores at once. A body of one chunk or less is
    stored without a thread. ``size`` counts the bytes stored once
    ``close()`` has returned.

    ``touch`` is an optional callable run inside each chunk's transaction
    (an upload session uses it to check it still exists and to mark it used).
    """

    def __init__(self, store, content_id, size, hasher, touch=None):
        self.store, self.content_id = store, content_id
        self.size, self.hasher, self.touch = size, hasher, touch
        self.buffer = bytearray()
        self.first = None
        self.queue = None
        self.thread = None
        self.failure = None

    def write(self, data):
        self.hasher.update(data)
        if not self.buffer and len(data) >= CHUNK_SIZE:
            self._submit(data)
            return
        self.buffer += data
        if len(self.buffer) >= CHUNK_SIZE:
            self._submit(bytes(self.buffer))
            self.buffer = bytearray()

    def close(self):
        """Store what is buffered and wait until every chunk is stored."""
        if self.thread is None:
            for chunk in (self.first, self.buffer):
                if chunk:
                    self._store(chunk)
        elif self.buffer:
            self._submit(bytes(self.buffer))
        self.first, self.buffer = None, bytearray()
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        if self.failure is not None:
            raise self.failure

    def _submit(self, chunk):
        if self.failure is not None:
            raise self.failure
        if self.thread is None and self.first is None:
            self.first = chunk
            return
        if self.thread is None:
            self.queue = queue.Queue(maxsize=2)
            self.thread = threading.Thread(target=self._drain, daemon=True,
                                           name="store content %d"
                                           % self.content_id)
            self.thread.start()
            self.queue.put(self.first)
            self.first = None
        self.queue.put(chunk)

    def _drain(self):
        while True:
            chunk = self.queue.get()
            if chunk is None:
                return
            if self.failure is None:
                try:
                    self._store(chunk)
                except BaseException as error:
                    self.failure = error

    def _store(self, data):
        with self.store.write() as db:
            if self.touch is not None:
                self.touch(db)
            # Room first, then the bytes through incremental blob I/O: this
            # saves binding (and copying) the chunk as a statement parameter.
            db.execute("INSERT INTO chunk (content_id, start, data) "
                       "VALUES (?, ?, zeroblob(?))",
                       (self.content_id, self.size, len(data)))
            with db.blobopen("main", "chunk", "data", db.last_insert_rowid(),
                              True) as blob:
                blob.write(data)
            db.execute("UPDATE content SET size = ? WHERE id = ?",
                       (self.size + len(data), self.content_id))
        self.size += len(data)


def rehash(store, content_id, size, algorithm="sha256"):
    """Hash the first ``size`` bytes of a stored content again."""
    hasher = hashlib.new(algorithm)
    for data in store.chunks(content_id, 0, size):
        hasher.update(data)
    return hasher


###############################################################################
# Request bodies and content responses ########################################
###############################################################################
#
# Bodies are read straight from ``wsgi.input`` in bounded reads (bottle's
# ``request.body`` would buffer them), whether they come with a
# Content-Length or with chunked transfer encoding.

def body_length(environ):
    """The declared Content-Length, or None for a chunked or absent body."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    value = environ.get("CONTENT_LENGTH") or "0"
    if not value.isdigit():
        raise BadBody("Content-Length %r is not a number" % value)
    return int(value)


def body_pieces(environ, limit=None):
    """Yield the request body in pieces; BadBody when it breaks off.

    ``limit`` bounds the number of bytes accepted (None: unbounded); a body
    over it raises BadBody with ``too_large`` set.
    """
    stream = environ["wsgi.input"]
    length = body_length(environ)
    if limit is not None and length is not None and length > limit:
        raise too_large(limit)
    pieces = chunked_pieces(stream) if length is None else \
        sized_pieces(stream, length)
    received = 0
    try:
        for piece in pieces:
            received += len(piece)
            if limit is not None and received > limit:
                raise too_large(limit)
            yield piece
    except (OSError, ValueError, cheroot.errors.MaxSizeExceeded) as error:
        raise BadBody("the request body broke off: %s" % error) from error
    if length is not None and received < length:
        raise BadBody("the request body ended after %d of the %d bytes its "
                      "Content-Length announced" % (received, length))


def sized_pieces(stream, length):
    """Pieces of a body with a Content-Length, a chunk's worth at a time."""
    received = 0
    while received < length:
        piece = stream.read(min(CHUNK_SIZE, length - received))
        if not piece:
            return
        received += len(piece)
        yield piece


def chunked_pieces(stream):
    """The pieces of a body in chunked transfer encoding, one HTTP chunk each.

    cheroot's ChunkedRFile parses the framing. Its ``read(n)`` copies the
    data again and again when ``n`` differs from the client's chunk size
    (seconds of CPU per gigabyte), so each chunk is taken whole from its
    buffer, falling back to ``read`` if that reader ever changes shape.
    """
    fetch = getattr(stream, "_fetch", None)
    if fetch is None or not isinstance(getattr(stream, "buffer", None), bytes):
        while True:
            piece = stream.read(READ_SIZE)
            if not piece:
                return
            yield piece
    while True:
        if not stream.buffer:
            fetch()
            if not stream.buffer:
                return
        piece, stream.buffer = stream.buffer, b""
        yield piece


def discard_body(environ, response):
    """Read what an error answer leaves unread of a chunked request body.

    cheroot reads the rest of a body with a Content-Length by itself, but
    not of a chunked one, whose bytes it would take for the next request on
    the connection. Up to DISCARD_LIMIT bytes are read; past that the answer
    says ``Connection: close``.
    """
    try:
        if body_length(environ) is not None:
            return
        for _piece in body_pieces(environ, DISCARD_LIMIT):
            pass
    except BadBody:
        response.set_header("Connection", "close")


def error_renderer(error_class, failure_for, headers=()):
    """A bottle plugin: the one place where a surface's errors become answers.

    Handlers raise ``error_class``; any other exception becomes one through
    ``failure_for``. ``headers`` go on every answer, errors included; other
    headers set before a failure (a blob's digest, say) are dropped.
    """
    def plugin(callback):
        def wrapper(*args, **kwargs):
            response = bottle.response
            for name, value in headers:
                response.set_header(name, value)
            try:
                return callback(*args, **kwargs)
            except error_class as error:
                failure = error
            except Exception as error:
                failure = failure_for(error)
            response.bind()
            for name, value in (*headers, *failure.headers.items()):
                response.set_header(name, value)
            discard_body(bottle.request.environ, response)
            response.status = failure.status
            response.content_type = "application/json"
            return failure.body().encode()
        return wrapper
    return plugin


def too_large(limit):
    error = BadBody("the body is larger than the limit of %d bytes" % limit)
    error.too_large = True
    return error


def read_body(environ, limit):
    """The whole (small) request body as bytes."""
    return b"".join(body_pieces(environ, limit))


def receive(environ, writer):
    """Copy the request body into a ContentWriter.

    What arrived before a body broke off is kept (an upload session can
    resume from there) and the BadBody is raised on.
    """
    try:
        for piece in body_pieces(environ):
            writer.write(piece)
    finally:
        writer.close()


class RangeNotSatisfiable(Exception):
    """A Range header whose first byte lies past the end of the content."""

    def __init__(self, size=0):
        super().__init__("the requested range is not satisfiable")
        self.size = size

    def headers(self):
        return {"Content-Range": "bytes */%d" % self.size,
                "Accept-Ranges": "bytes"}


class ContentGone(Exception):
    """The content was deleted between finding it and reading it."""


def parse_range(header, size):
    """The (start, end) byte range a Range header asks for, end exclusive.

    None means: send the whole content (no header, another unit, several
    ranges or a malformed one, all of which RFC 9110 lets a server ignore).
    """
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(size - length, 0), size
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable()
    end = size if last == "" else min(int(last) + 1, size)
    return start, end


def send_content(store, content_id, size):
    """Answer a GET or HEAD with a stored content, honouring Range.

    Sets status, Content-Length, Accept-Ranges and Content-Range on bottle's
    response and returns the body iterator. Raises RangeNotSatisfiable and
    ContentGone, which each surface renders in its own format.
    """
    response = bottle.response
    response.set_header("Accept-Ranges", "bytes")
    try:
        wanted = parse_range(bottle.request.environ.get("HTTP_RANGE"), size)
    except RangeNotSatisfiable:
        raise RangeNotSatisfiable(size) from None
    start, end = wanted or (0, size)
    if wanted is not None:
        response.status = 206
        response.set_header("Content-Range",
                            "bytes %d-%d/%d" % (start, end - 1, size))
    response.set_header("Content-Length", str(end - start))
    if bottle.request.method == "HEAD" or start == end:
        return b""
    pin = store.pin_live(content_id)
    if pin is None:
        raise ContentGone()
    return stream_and_unpin(store.chunks(content_id, start, end), pin)


def stream_and_unpin(chunks, pin):
    try:
        yield from chunks
    except Exception:
        # The status line has gone out; all that is left is to cut the
        # connection (the server does) and to tell the operator why.
        log.exception("sending stored content failed")
        raise
    finally:
        pin.release()


def http_date(timestamp):
    return email.utils.formatdate(timestamp, usegmt=True)


def iso_time(timestamp):
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def json_response(value, status=200, content_type="application/json"):
    bottle.response.status = status
    bottle.response.content_type = content_type
    return json.dumps(value, indent=None, separators=(",", ":")).encode()


def parse_json(data, what):
    """Decode JSON bytes strictly; ValueError with a reason when they are not."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError("%s is not valid UTF-8 (%s)" % (what, error)) from None
    try:
        return json.loads(text, object_pairs_hook=unique_keys,
                          parse_constant=no_constants)
    except RecursionError:
        raise ValueError("%s is nested too deeply" % what) from None
    except json.JSONDecodeError as error:
        raise ValueError("%s is not valid JSON (%s)" % (what, error)) from None
    except DuplicateKey as error:
        raise ValueError("%s has the key %r twice" % (what, error.args[0])) \
            from None
    except NotJson as error:
        raise ValueError("%s is not valid JSON (%s is not a JSON value)"
                         % (what, error.args[0])) from None


class DuplicateKey(Exception):
    """A JSON object names the same key twice (parsers disagree on those)."""


class NotJson(Exception):
    """NaN or Infinity, which Python's parser takes and JSON does not have."""


def unique_keys(pairs):
    document = {}
    for key, value in pairs:
        if key in document:
            raise DuplicateKey(key)
        document[key] = value
    return document


def no_constants(name):
    raise NotJson(name)


###############################################################################
# Registry protocol ###########################################################
###############################################################################
#
# Each docker repository is a registry: the Docker Registry HTTP API V2 and the
# OCI distribution-spec v1.1. Inside it, images have *names* (``team/app``)
# holding blobs, manifests and tags. Names contain slashes, so a request path
# is split from the right on the protocol's keywords.

NAME_PATTERN = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
TAG_PATTERN = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_PATTERN = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}
#: Headers on every answer of a registry port.
REGISTRY_HEADERS = (("Docker-Distribution-API-Version", "registry/2.0"),)
NAME_LIMIT = 255

ROUTES = (
    ("upload", re.compile(r"(?P<name>.+)/blobs/uploads/(?P<session>[^/]*)",
                          re.S)),
    ("blob", re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)", re.S)),
    ("manifest", re.compile(r"(?P<name>.+)/manifests/(?P<reference>[^/]+)",
                            re.S)),
    ("tags", re.compile(r"(?P<name>.+)/tags/list", re.S)),
    ("referrers", re.compile(r"(?P<name>.+)/referrers/(?P<digest>[^/]+)",
                             re.S)),
)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_TYPES = (DOCKER_MANIFEST_LIST, OCI_INDEX)
IMAGE_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
#: Layers of these media types are not stored in registries (they name URLs).
FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)


def check_name(name):
    if len(name) > NAME_LIMIT or not NAME_PATTERN.fullmatch(name):
        raise RegistryError("NAME_INVALID", 400, "invalid image name %r" % name,
                            {"name": name})


def check_digest(digest):
    """Raise DIGEST_INVALID unless ``digest`` is a supported, well-formed digest."""
    if not DIGEST_PATTERN.fullmatch(digest or ""):
        raise RegistryError("DIGEST_INVALID", 400,
                            "malformed digest %r" % digest)
    algorithm, encoded = digest.split(":", 1)
    if algorithm not in DIGEST_ALGORITHMS:
        raise RegistryError("DIGEST_INVALID", 400,
                            "unsupported digest algorithm %r" % algorithm)
    if not re.fullmatch("[a-f0-9]{%d}" % DIGEST_ALGORITHMS[algorithm], encoded):
        raise RegistryError(
            "DIGEST_INVALID", 400, "a %s digest is %d lower-case hex digits"
            % (algorithm, DIGEST_ALGORITHMS[algorithm]))
    return algorithm


def digest_of(data, algorithm="sha256"):
    return "%s:%s" % (algorithm, hashlib.new(algorithm, data).hexdigest())


def page_arguments(query):
    """The ``n`` and ``last`` of a listing request."""
    n = query.get("n")
    if n is not None:
        if not n.isdigit():
            raise RegistryError("UNSUPPORTED", 400,
                                "n must be a non-negative integer")
        n = int(n)
    return n, query.get("last") or ""


def paginate(values, n, last, link):
    """Cut a sorted list after ``last`` to ``n`` items; set Link when more remain."""
    if last:
        values = [value for value in values if value > last]
    if n is not None and len(values) > n:
        values = values[:n]
        if values:
            bottle.response.set_header(
                "Link", '<%s?%s>; rel="next"' % (link, urllib.parse.urlencode(
                    {"n": n, "last": values[-1]})))
    return values


class Registry:
    """The registry of one docker repository, as a Bottle app.

    Handlers are named after the protocol steps; each raises RegistryError
    for every failure, which ``_render_errors`` turns into the spec's body.
    """

    def __init__(self, depot, repository):
        self.depot, self.store = depot, depot.store
        self.repository = repository
        self._session_locks = {}
        self._hashers = {}
        self._locks_lock = threading.Lock()
        self.app = bottle.Bottle()
        self.app.install(error_renderer(RegistryError, registry_failure,
                                        REGISTRY_HEADERS))
        self.app.default_error_handler = self._bottle_error
        self.app.route("/<path:re:.*>", "ANY", self.dispatch)

    # Plumbing --------------------------------------------------------------

    def _bottle_error(self, error):
        for name, value in REGISTRY_HEADERS:
            bottle.response.set_header(name, value)
        bottle.response.content_type = "application/json"
        failure = RegistryError("UNKNOWN", error.status_code,
                                error.body or "internal error")
        return failure.body()

    @property
    def repository_id(self):
        return self.repository["id"]

    def dispatch(self, path):
        """Route a request under the registry by splitting its path from the right."""
        method = bottle.request.method
        # Bottle's route drops a trailing newline; the whole path decides.
        path = bottle.request.path[1:]
        if path in ("v2", "v2/"):
            return self.endpoint(method)
        if not path.startswith("v2/"):
            raise RegistryError("UNSUPPORTED", 404,
                                "no registry endpoint at /%s" % path)
        rest = path[3:]
        if rest == "_catalog":
            self.allow(method, "GET")
            return self.catalog()
        for route, pattern in ROUTES:
            match = pattern.fullmatch(rest)
            if match:
                arguments = match.groupdict()
                check_name(arguments["name"])
                return getattr(self, "route_" + route)(method, **arguments)
        raise RegistryError("UNSUPPORTED", 404,
                            "no registry endpoint at /%s" % path)

    @staticmethod
    def allow(method, *methods):
        if method not in methods:
            raise RegistryError(
                "UNSUPPORTED", 405, "method %s is not allowed here" % method,
                headers={"Allow": ", ".join(methods)})

    def route_upload(self, method, name, session):
        if not session:
            self.allow(method, "POST")
            return self.start_upload(name)
        self.allow(method, "GET", "PATCH", "PUT", "DELETE")
        return {"GET": self.upload_status, "PATCH": self.push_chunk,
                "PUT": self.finish_upload,
                "DELETE": self.cancel_upload}[method](name, session)

    def route_blob(self, method, name, digest):
        self.allow(method, "GET", "HEAD", "DELETE")
        check_digest(digest)
        if method == "DELETE":
            return self.delete_blob(name, digest)
        return self.get_blob(name, digest)

    def route_manifest(self, method, name, reference):
        self.allow(method, "GET", "HEAD", "PUT", "DELETE")
        if not TAG_PATTERN.fullmatch(reference):
            if ":" not in reference:
                raise RegistryError(
                    "DIGEST_INVALID", 400, "%r is neither a tag (up to 128 "
                    "letters, digits, '_', '.', '-', not starting with '.' or "
                    "'-') nor a digest" % reference)
            check_digest(reference)
        return {"GET": self.get_manifest, "HEAD": self.get_manifest,
                "PUT": self.put_manifest,
                "DELETE": self.delete_manifest}[method](name, reference)

    def route_tags(self, method, name):
        self.allow(method, "GET")
        return self.list_tags(name)

    def route_referrers(self, method, name, digest):
        self.allow(method, "GET")
        check_digest(digest)
        return self.list_referrers(name, digest)

    # Base and discovery ----------------------------------------------------

    def endpoint(self, method):
        """GET/HEAD /v2/: 200 with ``{}``; tells clients this is a V2 registry."""
        self.allow(method, "GET", "HEAD")
        return json_response({})

    def catalog(self):
        """GET /v2/_catalog: 200, image names sorted, with ``n``/``last`` and Link."""
        with self.store.read() as db:
            names = [row[0] for row in db.execute(
                "SELECT DISTINCT name FROM manifest WHERE repository_id = ? "
                "ORDER BY name", (self.repository_id,))]
        n, last = page_arguments(bottle.request.query)
        return json_response({"repositories": paginate(
            names, n, last, "/v2/_catalog")})

    def list_tags(self, name):
        """GET /v2/<name>/tags/list: 200 with sorted tags and Link; 404 NAME_UNKNOWN."""
        with self.store.read() as db:
            known = db.execute(
                "SELECT 1 FROM manifest WHERE repository_id = ? AND name = ? "
                "LIMIT 1", (self.repository_id, name)).fetchone()
            tags = [row[0] for row in db.execute(
                "SELECT tag FROM tag WHERE repository_id = ? AND name = ? "
                "ORDER BY tag", (self.repository_id, name))]
        if not known:
            raise RegistryError("NAME_UNKNOWN", 404,
                                "no image named %r in this registry" % name,
                                {"name": name})
        n, last = page_arguments(bottle.request.query)
        return json_response({"name": name, "tags": paginate(
            tags, n, last, "/v2/%s/tags/list" % name)})

    # Blobs -----------------------------------------------------------------

    def find_blob(self, db, name, digest):
        """(content id, size) of a blob linked into ``name`` (None: into any
        image name of this registry), or None."""
        return db.execute(
            "SELECT content.id, content.size FROM content JOIN blob "
            "ON blob.content_id = content.id WHERE content.digest = ? "
            "AND blob.repository_id = ? AND (? IS NULL OR blob.name = ?) "
            "LIMIT 1", (digest, self.repository_id, name, name)).fetchone()

    def require_repository(self, db):
        """404 when this registry's repository has been deleted meanwhile."""
        if not self.store.has_repository(db, self.repository_id):
            raise RegistryError("NAME_UNKNOWN", 404, "repository %r was deleted"
                                % self.repository["name"])

    def link_blob(self, db, name, content_id):
        self.require_repository(db)
        db.execute("INSERT OR IGNORE INTO blob (repository_id, name, content_id, "
                   "created_at) VALUES (?, ?, ?, ?)",
                   (self.repository_id, name, content_id, time.time()))

    def get_blob(self, name, digest):
        """GET/HEAD /v2/<name>/blobs/<digest>: 200 or 206 with Content-Length,
        Docker-Content-Digest and Accept-Ranges; 416; 404 BLOB_UNKNOWN."""
        with self.store.read() as db:
            found = self.find_blob(db, name, digest)
        if found is None:
            raise RegistryError("BLOB_UNKNOWN", 404,
                                "blob %s is unknown to %r" % (digest, name),
                                {"digest": digest})
        content_id, size = found
        response = bottle.response
        response.set_header("Docker-Content-Digest", digest)
        response.set_header("ETag", '"%s"' % digest)
        response.set_header("Cache-Control", "max-age=31536000")
        response.content_type = "application/octet-stream"
        return send_content(self.store, content_id, size)

    def delete_blob(self, name, digest):
        """DELETE /v2/<name>/blobs/<digest>: 202; 404 BLOB_UNKNOWN."""
        with self.store.write(durable=True) as db:
            found = self.find_blob(db, name, digest)
            if found is None:
                raise RegistryError("BLOB_UNKNOWN", 404,
                                    "blob %s is unknown to %r" % (digest, name),
                                    {"digest": digest})
            db.execute("DELETE FROM blob WHERE repository_id = ? AND name = ? "
                       "AND content_id = ?", (self.repository_id, name, found[0]))
        self.store.garbage.set()
        bottle.response.status = 202
        bottle.response.set_header("Docker-Content-Digest", digest)
        return b""

    # Uploads ---------------------------------------------------------------

    def start_upload(self, name):
        """POST /v2/<name>/blobs/uploads/: open an upload session.

        ``?digest=`` with a body: monolithic upload, 201 with Location and
        Docker-Content-Digest. ``?mount=&from=``: 201 when the blob can be
        linked, else a session. Otherwise 202 with Location, Range 0-0 and
        Docker-Upload-UUID.
        """
        query = bottle.request.query
        if query.get("mount"):
            check_digest(query["mount"])
            source = query.get("from")
            if source:
                check_name(source)
            if self.mount_blob(name, query["mount"], source):
                return self.blob_created(name, query["mount"])
        if query.get("digest"):
            return self.monolithic_upload(name, query["digest"])
        session = uuid.uuid4().hex
        # Not flushed: a session lost to a power failure is a 404 on the next
        # PATCH, and the client starts over.
        with self.store.write() as db:
            self.require_repository(db)
            content_id = self.store.new_content(db)
            now = time.time()
            db.execute("INSERT INTO upload (id, repository_id, name, content_id, "
                       "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (session, self.repository_id, name, content_id, now, now))
        log.debug("upload %s opened for %s", session, name)
        return self.upload_accepted(name, session, 0)

    def mount_blob(self, name, digest, source):
        """Link a blob already in this registry into ``name``; True on success.

        With ``source`` the blob must be linked there; without it, any image
        name in this registry that holds it will do.
        """
        with self.store.write(durable=True) as db:
            found = self.find_blob(db, source or None, digest)
            if found is None:
                return False
            self.link_blob(db, name, found[0])
        return True

    def monolithic_upload(self, name, digest):
        """The body of POST ...?digest= is the whole blob: 201 or DIGEST_INVALID."""
        algorithm = check_digest(digest)
        with self.store.write() as db:
            content_id = self.store.new_content(db)
            pin = self.store.pin(content_id)
        try:
            with pin:
                writer = ContentWriter(self.store, content_id, 0,
                                       hashlib.new(algorithm))
                receive(bottle.request.environ, writer)
                self.store_blob(name, content_id, writer.hasher, digest)
        finally:
            # A copy that was already stored, or a failed upload, is garbage.
            self.store.garbage.set()
        return self.blob_created(name, digest)

    def store_blob(self, name, content_id, hasher, digest, session=None):
        """Check the written bytes against ``digest`` and link the blob."""
        actual = "%s:%s" % (hasher.name, hasher.hexdigest())
        if actual != digest:
            raise RegistryError(
                "DIGEST_INVALID", 400, "the uploaded content has digest %s, "
                "not %s" % (actual, digest), {"digest": digest})
        with self.store.write(durable=True) as db:
            stored = self.store.finish_content(db, content_id, digest)
            self.link_blob(db, name, stored)
            if session is not None:
                db.execute("DELETE FROM upload WHERE id = ?", (session,))

    def blob_created(self, name, digest):
        response = bottle.response
        response.status = 201
        response.set_header("Location", "/v2/%s/blobs/%s" % (name, digest))
        response.set_header("Docker-Content-Digest", digest)
        response.set_header("Content-Length", "0")
        return b""

    def upload_accepted(self, name, session, size):
        response = bottle.response
        response.status = 202
        self.upload_headers(name, session, size)
        response.set_header("Content-Length", "0")
        return b""

    def upload_headers(self, name, session, size):
        response = bottle.response
        response.set_header("Location",
                            "/v2/%s/blobs/uploads/%s" % (name, session))
        response.set_header("Range", "0-%d" % max(size - 1, 0))
        response.set_header("Docker-Upload-UUID", session)

    def find_upload(self, name, session):
        """(content id, size) of an open session of ``name``; else 404."""
        with self.store.read() as db:
            found = db.execute(
                "SELECT content.id, content.size FROM upload JOIN content "
                "ON content.id = upload.content_id WHERE upload.id = ? "
                "AND upload.repository_id = ? AND upload.name = ?",
                (session, self.repository_id, name)).fetchone()
        if found is None:
            raise RegistryError("BLOB_UPLOAD_UNKNOWN", 404,
                                "upload session %r is unknown" % session,
                                {"session": session})
        return found

    @contextlib.contextmanager
    def session_lock(self, session):
        with self._locks_lock:
            lock = self._session_locks.setdefault(session, threading.Lock())
        with lock:
            yield

    def forget_session(self, session):
        with self._locks_lock:
            self._session_locks.pop(session, None)
            self._hashers.pop(session, None)

    def upload_status(self, name, session):
        """GET /v2/<name>/blobs/uploads/<session>: 204 with Range and Location."""
        _content_id, size = self.find_upload(name, session)
        bottle.response.status = 204
        self.upload_headers(name, session, size)
        return b""

    def append_body(self, name, session, content_id, size):
        """Append the request body to a session, honouring Content-Range.

        Returns the new size. A Content-Range that does not start where the
        upload ends is 416 with the current Range.
        """
        environ = bottle.request.environ
        content_range = environ.get("HTTP_CONTENT_RANGE")
        if content_range:
            match = re.fullmatch(r"\s*(?:bytes[ =])?(\d+)-(\d+)(?:/\S+)?\s*",
                                 content_range)
            if not match:
                raise RegistryError("BLOB_UPLOAD_INVALID", 400,
                                    "malformed Content-Range %r" % content_range)
            start, end = int(match.group(1)), int(match.group(2))
            if start != size or end < start:
                raise RegistryError(
                    "BLOB_UPLOAD_INVALID", 416,
                    "the chunk starts at %d but the upload holds %d bytes"
                    % (start, size),
                    headers={"Range": "0-%d" % max(size - 1, 0),
                             "Location": "/v2/%s/blobs/uploads/%s"
                                         % (name, session)})
            length = body_length(environ)
            if length is not None and length != end - start + 1:
                raise RegistryError(
                    "SIZE_INVALID", 400, "Content-Range %r announces %d bytes "
                    "but Content-Length is %d" % (content_range,
                                                  end - start + 1, length))
        hasher = self._hashers.get(session)
        if hasher is None or hasher[0] != size:
            hasher = (size, rehash(self.store, content_id, size))

        def touch(db):
            db.execute("UPDATE upload SET updated_at = ? WHERE id = ?",
                       (time.time(), session))
            if db.changes() == 0:
                raise RegistryError("BLOB_UPLOAD_UNKNOWN", 404,
                                    "upload session %r is gone" % session)

        writer = ContentWriter(self.store, content_id, size, hasher[1], touch)
        with self.store.pin(content_id):
            try:
                receive(environ, writer)
            except BaseException:
                # The hash may have seen bytes that were not stored.
                self._hashers.pop(session, None)
                raise
        self._hashers[session] = (writer.size, writer.hasher)
        return writer.size

    def push_chunk(self, name, session):
        """PATCH /v2/<name>/blobs/uploads/<session>: append a chunk or a stream.

        202 with Location, Range and Docker-Upload-UUID; 416 for a chunk out
        of order; 404 BLOB_UPLOAD_UNKNOWN.
        """
        with self.session_lock(session):
            content_id, size = self.find_upload(name, session)
            size = self.append_body(name, session, content_id, size)
        return self.upload_accepted(name, session, size)

    def finish_upload(self, name, session):
        """PUT /v2/<name>/blobs/uploads/<session>?digest=: close the session.

        An optional last chunk comes in the body. 201 with Location and
        Docker-Content-Digest; 400 DIGEST_INVALID (and the session is removed)
        when the content does not match.
        """
        digest = bottle.request.query.get("digest")
        if not digest:
            raise RegistryError("DIGEST_INVALID", 400,
                                "the digest query parameter is required")
        algorithm = check_digest(digest)
        with self.session_lock(session):
            content_id, size = self.find_upload(name, session)
            size = self.append_body(name, session, content_id, size)
            hasher = self._hashers[session][1]
            if algorithm != hasher.name:
                hasher = rehash(self.store, content_id, size, algorithm)
            try:
                self.store_blob(name, content_id, hasher, digest, session)
            except RegistryError:
                self.remove_session(session)
                raise
            self.forget_session(session)
        self.store.garbage.set()
        return self.blob_created(name, digest)

    def remove_session(self, session):
        with self.store.write(durable=True) as db:
            db.execute("DELETE FROM upload WHERE id = ?", (session,))
        self.forget_session(session)
        self.store.garbage.set()

    def cancel_upload(self, name, session):
        """DELETE /v2/<name>/blobs/uploads/<session>: 204; 404 BLOB_UPLOAD_UNKNOWN."""
        with self.session_lock(session):
            self.find_upload(name, session)
            self.remove_session(session)
        bottle.response.status = 204
        return b""

    # Manifests -------------------------------------------------------------

    def find_manifest(self, db, name, reference):
        """(digest, media type, bytes) of a manifest by tag or digest, or None."""
        if TAG_PATTERN.fullmatch(reference):
            row = db.execute(
                "SELECT digest FROM tag WHERE repository_id = ? AND name = ? "
                "AND tag = ?", (self.repository_id, name, reference)).fetchone()
            if row is None:
                return None
            reference = row[0]
        return db.execute(
            "SELECT digest, media_type, data FROM manifest WHERE "
            "repository_id = ? AND name = ? AND digest = ?",
            (self.repository_id, name, reference)).fetchone()

    def get_manifest(self, name, reference):
        """GET/HEAD /v2/<name>/manifests/<reference>: the stored bytes.

        200 with Content-Type (the stored media type), Content-Length and
        Docker-Content-Digest; 404 MANIFEST_UNKNOWN.
        """
        with self.store.read() as db:
            found = self.find_manifest(db, name, reference)
        if found is None:
            raise RegistryError("MANIFEST_UNKNOWN", 404,
                                "manifest %r of %r is unknown" % (reference, name),
                                {"name": name, "reference": reference})
        digest, media_type, data = found
        response = bottle.response
        response.content_type = media_type
        response.set_header("Docker-Content-Digest", digest)
        response.set_header("ETag", '"%s"' % digest)
        response.set_header("Content-Length", str(len(data)))
        return b"" if bottle.request.method == "HEAD" else data

    def put_manifest(self, name, reference):
        """PUT /v2/<name>/manifests/<reference>: store a manifest by tag or digest.

        201 with Location, Docker-Content-Digest and, when it has a subject,
        OCI-Subject; 400 MANIFEST_INVALID, MANIFEST_BLOB_UNKNOWN or
        DIGEST_INVALID; 413 SIZE_INVALID over MANIFEST_LIMIT.
        """
        try:
            data = read_body(bottle.request.environ, MANIFEST_LIMIT)
        except BadBody as error:
            if getattr(error, "too_large", False):
                raise RegistryError("SIZE_INVALID", 413, str(error)) from None
            raise
        if TAG_PATTERN.fullmatch(reference):
            digest = digest_of(data)
        else:
            digest = digest_of(data, reference.split(":", 1)[0])
            if digest != reference:
                raise RegistryError(
                    "DIGEST_INVALID", 400, "the manifest has digest %s, not %s"
                    % (digest, reference), {"digest": reference})
        manifest = parse_manifest(data, bottle.request.content_type)
        with self.store.write(durable=True) as db:
            self.require_repository(db)
            self.check_references(db, name, manifest)
            db.execute(
                "INSERT INTO manifest (repository_id, name, digest, media_type, "
                "artifact_type, subject, data, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "media_type = excluded.media_type, data = excluded.data, "
                "artifact_type = excluded.artifact_type, "
                "subject = excluded.subject",
                (self.repository_id, name, digest, manifest.media_type,
                 manifest.artifact_type, manifest.subject, data, time.time()))
            if TAG_PATTERN.fullmatch(reference):
                db.execute(
                    "INSERT INTO tag (repository_id, name, tag, digest, "
                    "updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                    "SET digest = excluded.digest, updated_at = excluded.updated_at",
                    (self.repository_id, name, reference, digest, time.time()))
        response = bottle.response
        response.status = 201
        response.set_header("Location", "/v2/%s/manifests/%s" % (name, digest))
        response.set_header("Docker-Content-Digest", digest)
        response.set_header("Content-Length", "0")
        if manifest.subject:
            response.set_header("OCI-Subject", manifest.subject)
        return b""

    def check_references(self, db, name, manifest):
        """MANIFEST_BLOB_UNKNOWN unless every blob and child manifest is here."""
        for digest in manifest.blobs:
            if self.find_blob(db, name, digest) is None:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN", 400,
                    "blob %s is not in %r; push it first" % (digest, name),
                    {"digest": digest})
        for digest in manifest.children:
            row = db.execute(
                "SELECT 1 FROM manifest WHERE repository_id = ? AND name = ? "
                "AND digest = ?", (self.repository_id, name, digest)).fetchone()
            if row is None:
                raise RegistryError(
                    "MANIFEST_BLOB_UNKNOWN", 400,
                    "manifest %s is not in %r; push it first" % (digest, name),
                    {"digest": digest})

    def delete_manifest(self, name, reference):
        """DELETE /v2/<name>/manifests/<reference>: 202.

        By digest the manifest and every tag on it go; by tag only the tag.
        404 MANIFEST_UNKNOWN.
        """
        with self.store.write(durable=True) as db:
            if TAG_PATTERN.fullmatch(reference):
                db.execute("DELETE FROM tag WHERE repository_id = ? AND name = ? "
                           "AND tag = ?", (self.repository_id, name, reference))
            else:
                db.execute("DELETE FROM tag WHERE repository_id = ? AND name = ? "
                           "AND digest = ?", (self.repository_id, name, reference))
                db.execute("DELETE FROM manifest WHERE repository_id = ? AND "
                           "name = ? AND digest = ?",
                           (self.repository_id, name, reference))
            if db.changes() == 0:
                raise RegistryError(
                    "MANIFEST_UNKNOWN", 404,
                    "manifest %r of %r is unknown" % (reference, name),
                    {"name": name, "reference": reference})
        bottle.response.status = 202
        return b""

    def list_referrers(self, name, digest):
        """GET /v2/<name>/referrers/<digest>: 200, an OCI image index.

        The manifests whose subject is ``digest``; ``?artifactType=`` filters
        them and is echoed in OCI-Filters-Applied.
        """
        wanted = bottle.request.query.get("artifactType")
        with self.store.read() as db:
            rows = db.execute(
                "SELECT digest, media_type, artifact_type, data FROM manifest "
                "WHERE repository_id = ? AND name = ? AND subject = ? "
                "ORDER BY created_at, digest",
                (self.repository_id, name, digest)).fetchall()
        descriptors = []
        for referrer, media_type, artifact_type, data in rows:
            if wanted and artifact_type != wanted:
                continue
            descriptor = {"mediaType": media_type, "digest": referrer,
                          "size": len(data)}
            if artifact_type:
                descriptor["artifactType"] = artifact_type
            annotations = json.loads(data).get("annotations")
            if annotations:
                descriptor["annotations"] = annotations
            descriptors.append(descriptor)
        if wanted:
            bottle.response.set_header("OCI-Filters-Applied", "artifactType")
        return json_response({"schemaVersion": 2, "mediaType": OCI_INDEX,
                              "manifests": descriptors},
                             content_type=OCI_INDEX)

    # Status ----------------------------------------------------------------

    def contents(self):
        """What the registry holds: image names, tags, manifests, blobs, bytes."""
        with self.store.read() as db:
            names = [row[0] for row in db.execute(
                "SELECT DISTINCT name FROM manifest WHERE repository_id = ? "
                "ORDER BY name", (self.repository_id,))]
            tags, = db.execute("SELECT count(*) FROM tag WHERE repository_id = ?",
                               (self.repository_id,)).fetchone()
            manifests, = db.execute(
                "SELECT count(*) FROM manifest WHERE repository_id = ?",
                (self.repository_id,)).fetchone()
            blobs, size = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM content WHERE id "
                "IN (SELECT content_id FROM blob WHERE repository_id = ?)",
                (self.repository_id,)).fetchone()
            uploads, = db.execute(
                "SELECT count(*) FROM upload WHERE repository_id = ?",
                (self.repository_id,)).fetchone()
        return {"images": names, "tags": tags, "manifests": manifests,
                "blobs": blobs, "bytes": size, "uploads": uploads}


def registry_failure(error):
    """The RegistryError that answers an unexpected exception in a handler."""
    full = storage_failure(error)
    if full is not None or isinstance(error, StorageFull):
        log.warning("storage full: %s", error)
        return RegistryError("UNKNOWN", 507, "the registry's storage is full; "
                             "free space and try again")
    if isinstance(error, BadBody):
        return RegistryError("BLOB_UPLOAD_INVALID", 400, str(error))
    if isinstance(error, RangeNotSatisfiable):
        return RegistryError("UNSUPPORTED", 416, str(error),
                             headers=error.headers())
    if isinstance(error, ContentGone):
        return RegistryError("BLOB_UNKNOWN", 404,
                             "the blob was deleted while being read")
    log.exception("internal error")
    return RegistryError("UNKNOWN", 500, "internal error: %s" % error)


class Manifest:
    """What Depot needs to know of a manifest to store it."""

    def __init__(self, media_type, blobs=(), children=(), subject=None,
                 artifact_type=None):
        self.media_type, self.blobs, self.children = media_type, blobs, children
        self.subject, self.artifact_type = subject, artifact_type


def parse_manifest(data, content_type):
    """Check a manifest body and say what it references; MANIFEST_INVALID if bad.

    The media type is the request's Content-Type, else the body's
    ``mediaType``; image manifests reference blobs, indexes child manifests.
    """
    def invalid(message):
        return RegistryError("MANIFEST_INVALID", 400, message)

    try:
        document = parse_json(data, "the manifest")
    except ValueError as error:
        raise invalid(str(error)) from None
    if not isinstance(document, dict):
        raise invalid("the manifest is not a JSON object")
    declared = document.get("mediaType")
    content_type = (content_type or "").split(";")[0].strip()
    if content_type in ("", "application/json", "application/octet-stream"):
        content_type = None
    media_type = content_type or declared
    if media_type in SCHEMA1_TYPES or document.get("schemaVersion") == 1:
        raise invalid("Docker image manifest schema 1 is not supported; push "
                      "with a current client (schema 2 or OCI)")
    if document.get("schemaVersion") != 2:
        raise invalid("schemaVersion must be 2")
    if declared is not None and content_type and declared != content_type:
        raise invalid("the body's mediaType %r differs from the Content-Type %r"
                      % (declared, content_type))
    is_index = "manifests" in document or media_type in INDEX_TYPES
    if media_type is None:
        media_type = OCI_INDEX if is_index else OCI_MANIFEST
    if not isinstance(media_type, str) or "/" not in media_type:
        raise invalid("unknown media type %r" % (media_type,))

    subject = document.get("subject")
    if subject is not None:
        subject = descriptor_digest(subject, "subject", invalid)
    artifact_type = document.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise invalid("artifactType must be a string")

    if is_index:
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise invalid("manifests must be a list")
        children = [descriptor_digest(entry, "manifests[%d]" % number, invalid)
                    for number, entry in enumerate(entries)]
        return Manifest(media_type, children=children, subject=subject,
                        artifact_type=artifact_type)

    config = document.get("config")
    if config is None and media_type in IMAGE_TYPES:
        raise invalid("an image manifest needs a config")
    layers = document.get("layers", [])
    if not isinstance(layers, list):
        raise invalid("layers must be a list")
    blobs = []
    if config is not None:
        blobs.append(descriptor_digest(config, "config", invalid))
        if not artifact_type:
            artifact_type = config.get("mediaType")
    for number, layer in enumerate(layers):
        digest = descriptor_digest(layer, "layers[%d]" % number, invalid)
        if layer.get("mediaType") not in FOREIGN_LAYER_TYPES:
            blobs.append(digest)
    return Manifest(media_type, blobs=blobs, subject=subject,
                    artifact_type=artifact_type)


def descriptor_digest(descriptor, where, invalid):
    """The digest of a descriptor, checked; MANIFEST_INVALID when malformed."""
    if not isinstance(descriptor, dict):
        raise invalid("%s is not a descriptor object" % where)
    digest = descriptor.get("digest")
    if not isinstance(digest, str):
        raise invalid("%s has no digest" % where)
    try:
        check_digest(digest)
    except RegistryError as error:
        raise invalid("%s: %s" % (where, error.message)) from None
    size = descriptor.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise invalid("%s has an invalid size" % where)
    return digest


###############################################################################
# Raw files ###################################################################
###############################################################################
#
# A raw repository maps paths to content: ``PUT /repository/<name>/<path>``
# stores a file, ``GET`` reads it back, a path ending in ``/`` lists a
# directory. Directories are implied by the paths of the files below them.

#: Control characters, backslashes, and slashes or backslashes left encoded
#: by the server (cheroot keeps ``%2F`` as it is in PATH_INFO).
RAW_PATH_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]|%2[fF]|%5[cC]")
SHA256_HEX = re.compile(r"[a-f0-9]{64}")
#: Content types that clients send by default and that say nothing of the file.
MEANINGLESS_TYPES = ("", "application/x-www-form-urlencoded")


def check_raw_path(path):
    """400 unless ``path`` is a clean relative path inside a repository."""
    if len(path) > RAW_PATH_LIMIT:
        raise ApiError(400, "path: longer than %d characters" % RAW_PATH_LIMIT)
    if RAW_PATH_FORBIDDEN.search(path):
        raise ApiError(400, "path: backslashes, encoded slashes and control "
                            "characters are not allowed")
    segments = path.rstrip("/").split("/") if path.rstrip("/") else []
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ApiError(400, "path: empty, '.' and '..' segments are not "
                                "allowed (%r)" % path)


class RawFiles:
    """Files of raw repositories, served on the main port under /repository/."""

    def __init__(self, depot):
        self.depot, self.store = depot, depot.store

    def handle(self, repository, path):
        """Dispatch a request for ``path`` in a raw repository by method."""
        method = bottle.request.method
        check_raw_path(path)
        if path == "" or path.endswith("/"):
            if method not in ("GET", "HEAD"):
                raise ApiError(405, "a directory can only be listed (GET)",
                               {"Allow": "GET, HEAD"})
            return self.list_directory(repository, path)
        if method in ("GET", "HEAD"):
            return self.get_file(repository, path)
        if method == "PUT":
            return self.put_file(repository, path)
        if method == "DELETE":
            return self.delete_file(repository, path)
        raise ApiError(405, "method %s is not allowed on a file" % method,
                       {"Allow": "GET, HEAD, PUT, DELETE"})

    def find_file(self, db, repository, path):
        return db.execute(
            "SELECT content.id, content.size, content.digest, media_type, "
            "raw_file.updated_at FROM raw_file JOIN content "
            "ON content.id = raw_file.content_id "
            "WHERE repository_id = ? AND path = ?",
            (repository["id"], path)).fetchone()

    def get_file(self, repository, path):
        """GET/HEAD a file: 200 or 206 with Content-Length, Content-Type, ETag,
        Last-Modified and X-Checksum-Sha256; 304 for a matching
        If-None-Match; 416; 404."""
        # A replace between finding the file and pinning its content frees
        # the old content; the file is then looked up again, and a reader
        # gets the new version whole.
        for attempt in range(3):
            with self.store.read() as db:
                found = self.find_file(db, repository, path)
            if found is None:
                raise ApiError(404, "no file %r in repository %r"
                               % (path, repository["name"]))
            try:
                return self.send_file(*found)
            except ContentGone:
                if attempt == 2:
                    raise

    def send_file(self, content_id, size, digest, media_type, updated_at):
        sha256 = digest.split(":", 1)[1]
        response = bottle.response
        etag = '"%s"' % sha256
        response.set_header("ETag", etag)
        response.set_header("Last-Modified", http_date(updated_at))
        response.set_header("X-Checksum-Sha256", sha256)
        if etag_matches(bottle.request.environ.get("HTTP_IF_NONE_MATCH"), etag):
            response.status = 304
            return b""
        response.content_type = media_type
        # Uploaded pages must not run as the management API's origin.
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("Content-Security-Policy", "sandbox")
        return send_content(self.store, content_id, size)

    def put_file(self, repository, path):
        """PUT a file, streamed into the store: 201 when new, 200 when replaced.

        An ``X-Checksum-Sha256`` header states the expected SHA-256; a
        mismatch is 400 and nothing is stored. 409 when the path runs into a
        file or directory of the same name.
        """
        request = bottle.request
        if "CONTENT_LENGTH" not in request.environ and \
                "chunked" not in request.environ.get("HTTP_TRANSFER_ENCODING", ""):
            raise ApiError(411, "a file needs a Content-Length or chunked "
                                "transfer encoding")
        expected = (request.get_header("X-Checksum-Sha256") or "").strip().lower()
        expected = expected.removeprefix("sha256:")
        if expected and not SHA256_HEX.fullmatch(expected):
            raise ApiError(400, "X-Checksum-Sha256: not 64 hex digits")
        media_type = request.get_header("Content-Type", "").strip()
        if media_type.split(";")[0].strip().lower() in MEANINGLESS_TYPES:
            media_type = guess_media_type(path)
        with self.store.read() as db:
            self.check_room(db, repository, path)

        with self.store.write() as db:
            content_id = self.store.new_content(db)
            pin = self.store.pin(content_id)
        try:
            writer = ContentWriter(self.store, content_id, 0, hashlib.sha256())
            receive(request.environ, writer)
            sha256 = writer.hasher.hexdigest()
            if expected and expected != sha256:
                raise ApiError(400, "X-Checksum-Sha256 is %s but the body's "
                                    "SHA-256 is %s; nothing was stored"
                               % (expected, sha256))
            now = time.time()
            with self.store.write(durable=True) as db:
                if not self.store.has_repository(db, repository["id"]):
                    raise ApiError(404, "repository %r was deleted during the "
                                        "upload" % repository["name"])
                self.check_room(db, repository, path)
                stored = self.store.finish_content(db, content_id,
                                                   "sha256:" + sha256)
                replaced = self.find_file(db, repository, path) is not None
                db.execute(
                    "INSERT INTO raw_file (repository_id, path, content_id, "
                    "media_type, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "content_id = excluded.content_id, "
                    "media_type = excluded.media_type, "
                    "updated_at = excluded.updated_at",
                    (repository["id"], path, stored, media_type, now, now))
        finally:
            pin.release()
            self.store.garbage.set()
        bottle.response.set_header("ETag", '"%s"' % sha256)
        bottle.response.set_header("Location", "/repository/%s/%s"
                                   % (repository["name"], path))
        return json_response({"path": path, "size": writer.size,
                              "sha256": sha256, "content_type": media_type},
                             status=200 if replaced else 201)

    def check_room(self, db, repository, path):
        """409 when a parent of ``path`` is a file or ``path`` is a directory."""
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if db.execute("SELECT 1 FROM raw_file WHERE repository_id = ? AND "
                          "path = ?", (repository["id"], parent)).fetchone():
                raise ApiError(409, "path: %r is a file, so it cannot hold %r"
                               % (parent, path))
        below = db.execute(
            "SELECT 1 FROM raw_file WHERE repository_id = ? AND path > ? AND "
            "path < ? LIMIT 1", (repository["id"], path + "/", path + "0"))
        if below.fetchone():
            raise ApiError(409, "path: %r is a directory" % path)

    def delete_file(self, repository, path):
        """DELETE a file: 204; 404 when there is none."""
        with self.store.write(durable=True) as db:
            db.execute("DELETE FROM raw_file WHERE repository_id = ? AND "
                       "path = ?", (repository["id"], path))
            if db.changes() == 0:
                raise ApiError(404, "no file %r in repository %r"
                               % (path, repository["name"]))
        self.store.garbage.set()
        bottle.response.status = 204
        return b""

    def list_directory(self, repository, path):
        """GET a directory (a path ending in /): 200 with its entries as JSON,
        or as an HTML page for a browser; 404 for a directory with no files."""
        # The paths below ``dir/`` sort between "dir/" and "dir0" ('0'
        # follows '/'); the root has no upper bound.
        upper = path[:-1] + "0" if path else None
        with self.store.read() as db:
            rows = db.execute(
                "SELECT path, content.size, content.digest, media_type, "
                "updated_at FROM raw_file JOIN content ON content.id = "
                "raw_file.content_id WHERE repository_id = ? AND path > ? "
                "AND (? IS NULL OR path < ?) ORDER BY path",
                (repository["id"], path, upper, upper)).fetchall()
        if path and not rows:
            raise ApiError(404, "no directory %r in repository %r"
                           % (path, repository["name"]))
        entries = {}
        for file_path, size, digest, media_type, updated_at in rows:
            child = file_path[len(path):]
            if "/" in child:
                directory = child.split("/", 1)[0]
                entries.setdefault(directory, {
                    "name": directory, "path": path + directory + "/",
                    "type": "directory"})
            else:
                entries[child] = {
                    "name": child, "path": file_path, "type": "file",
                    "size": size, "sha256": digest.split(":", 1)[1],
                    "content_type": media_type,
                    "last_modified": iso_time(updated_at)}
        listing = {"repository": repository["name"], "path": path,
                   "entries": sorted(entries.values(), key=lambda e: e["name"])}
        if wants_html(bottle.request.environ.get("HTTP_ACCEPT", "")):
            return html_listing(listing)
        return json_response(listing)


#: What a compressed file is, by the compression mimetypes finds in its name.
COMPRESSED_TYPES = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                    "xz": "application/x-xz", "br": "application/x-brotli",
                    "compress": "application/x-compress"}


def guess_media_type(path):
    """The media type of a file from its name: ``app.tar.gz`` is gzip."""
    media_type, encoding = mimetypes.guess_type(path)
    return COMPRESSED_TYPES.get(encoding) or media_type or \
        "application/octet-stream"


def etag_matches(header, etag):
    """True when an If-None-Match header names ``etag`` (or is ``*``)."""
    if not header:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags


def wants_html(accept):
    """True when the client prefers an HTML page to JSON (a browser does)."""
    types = [part.split(";")[0].strip() for part in accept.split(",")]
    return "text/html" in types and (
        "application/json" not in types
        or types.index("text/html") < types.index("application/json"))


def html_listing(listing):
    title = "/repository/%s/%s" % (listing["repository"], listing["path"])
    rows = []
    if listing["path"]:
        rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
    for entry in listing["entries"]:
        name = entry["name"] + ("/" if entry["type"] == "directory" else "")
        rows.append('<tr><td><a href="%s">%s</a></td><td>%s</td><td>%s</td></tr>'
                    % (urllib.parse.quote(name), html.escape(name),
                       entry.get("size", ""),
                       html.escape(entry.get("last_modified", ""))))
    bottle.response.content_type = "text/html; charset=utf-8"
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>%s"
            "</title></head><body><h1>%s</h1><table><tr><th>name</th>"
            "<th>bytes</th><th>modified</th></tr>%s</table></body></html>"
            % (html.escape(title), html.escape(title), "".join(rows))).encode()


###############################################################################
# Management API ##############################################################
###############################################################################
#
# JSON under /api/v1 on the main HTTPS port: create, list, show, change and
# delete repositories. Errors are ``{"error": "..."}`` and name the field.

REPOSITORY_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
REPOSITORY_TYPES = ("raw", "docker")
REPOSITORY_FIELDS = ("name", "type", "description", "config")
PATCH_FIELDS = ("description", "config")
DOCKER_CONFIG = ("http_port", "https_port")
DESCRIPTION_LIMIT = 4096


def repository_record(row):
    """A repository row as a dict."""
    keys = ("id", "name", "type", "description", "config", "created_at",
            "updated_at")
    record = dict(zip(keys, row))
    record["config"] = json.loads(record["config"])
    return record


def check_config(kind, config):
    """The repository config with defaults filled in; 400 naming what is wrong."""
    if config is None:
        return {"http_port": 5000, "https_port": 0} if kind == "docker" else {}
    if not isinstance(config, dict):
        raise ApiError(400, "config: must be an object")
    allowed = DOCKER_CONFIG if kind == "docker" else ()
    for key in config:
        if key not in allowed:
            raise ApiError(400, "config.%s: unknown setting for a %s repository"
                           "%s" % (key, kind, "; allowed: " + ", ".join(allowed)
                                   if allowed else " (it takes none)"))
    if kind != "docker":
        return {}
    checked = {}
    for key in DOCKER_CONFIG:
        value = config.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ApiError(400, "config.%s: must be an integer port number" % key)
        if not 0 <= value <= 65535:
            raise ApiError(400, "config.%s: %d is out of range (1-65535, or 0 "
                                "for none)" % (key, value))
        checked[key] = value
    if checked["http_port"] and checked["http_port"] == checked["https_port"]:
        raise ApiError(400, "config: http_port and https_port must differ")
    return checked


class Management:
    """The main port's Bottle app: the management API and raw files."""

    def __init__(self, depot):
        self.depot, self.store = depot, depot.store
        self.raw = RawFiles(depot)
        app = self.app = bottle.Bottle()
        app.install(error_renderer(ApiError, api_failure))
        app.default_error_handler = self._bottle_error
        app.route("/api/v1/health", "GET", self.health)
        app.route("/api/v1/openapi.json", "GET", self.openapi)
        app.route("/api/v1/repositories", "GET", self.list_repositories)
        app.route("/api/v1/repositories", "POST", self.create_repository)
        app.route("/api/v1/repositories/<name>", "GET", self.show_repository)
        app.route("/api/v1/repositories/<name>", "PATCH", self.change_repository)
        app.route("/api/v1/repositories/<name>", "DELETE",
                  self.delete_repository)
        app.route("/repository/<name>", "ANY", self.raw_request)
        app.route("/repository/<name>/<path:re:.*>", "ANY", self.raw_request)

    # Plumbing --------------------------------------------------------------

    def _bottle_error(self, error):
        bottle.response.content_type = "application/json"
        messages = {404: "not found: %s" % bottle.request.path,
                    405: "method %s is not allowed on %s"
                         % (bottle.request.method, bottle.request.path)}
        message = messages.get(error.status_code) or str(error.body)
        return ApiError(error.status_code, message).body()

    def json_body(self, allowed):
        """The request's JSON object, checked for unknown fields."""
        try:
            data = read_body(bottle.request.environ, API_BODY_LIMIT)
            document = parse_json(data, "the request body")
        except BadBody as error:
            raise ApiError(413 if getattr(error, "too_large", False) else 400,
                           str(error)) from None
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        if not isinstance(document, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for field in document:
            if field not in allowed:
                raise ApiError(400, "%s: unknown field; allowed: %s"
                               % (field, ", ".join(allowed)))
        return document

    def find_repository(self, name):
        with self.store.read() as db:
            row = db.execute(
                "SELECT id, name, type, description, config, created_at, "
                "updated_at FROM repository WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ApiError(404, "no repository named %r" % name)
        return repository_record(row)

    def describe(self, repository, detailed=False):
        """The public view of a repository; ``detailed`` adds what it holds."""
        host = request_host()
        view = {key: repository[key] for key in
                ("name", "type", "description", "config")}
        view["created_at"] = iso_time(repository["created_at"])
        view["updated_at"] = iso_time(repository["updated_at"])
        if repository["type"] == "raw":
            view["url"] = "https://%s:%d/repository/%s/" % (
                host, self.depot.settings.port, repository["name"])
        else:
            view["registry"] = self.depot.registry_status(repository["name"],
                                                          host)
        if detailed:
            view["content"] = self.depot.contents(repository)
        return view

    # Handlers --------------------------------------------------------------

    def health(self):
        """GET /api/v1/health: 200 when the database answers, else 503."""
        healthy = self.store.healthy()
        return json_response({"status": "ok" if healthy else "unavailable",
                              "version": __version__,
                              "database": "ok" if healthy else "unavailable"},
                             status=200 if healthy else 503)

    def openapi(self):
        """GET /api/v1/openapi.json: this API as an OpenAPI 3.0 document."""
        return json_response(OPENAPI)

    def list_repositories(self):
        """GET /api/v1/repositories: 200, every repository sorted by name."""
        with self.store.read() as db:
            rows = db.execute(
                "SELECT id, name, type, description, config, created_at, "
                "updated_at FROM repository ORDER BY name").fetchall()
        return json_response([self.describe(repository_record(row))
                              for row in rows])

    def create_repository(self):
        """POST /api/v1/repositories: 201 with the repository and Location.

        400 names the field that is wrong; 409 when the name is taken or a
        port cannot be had. A docker repository's servers are up before 201.
        """
        document = self.json_body(REPOSITORY_FIELDS)
        name = document.get("name")
        if not isinstance(name, str) or not REPOSITORY_NAME.fullmatch(name):
            raise ApiError(400, "name: %s; lower-case letters, digits, '.', "
                                "'_' and '-', starting with a letter or digit, "
                                "at most 64 characters"
                           % ("required" if name is None else
                              "must be a string" if not isinstance(name, str)
                              else "invalid"))
        kind = document.get("type")
        if kind not in REPOSITORY_TYPES:
            raise ApiError(400, "type: %s; one of %s" % (
                "required" if kind is None else "unknown type %r" % (kind,),
                ", ".join(REPOSITORY_TYPES)))
        description = check_description(document.get("description", ""))
        if "config" in document and not isinstance(document["config"], dict):
            raise ApiError(400, "config: must be an object")
        config = check_config(kind, document.get("config"))
        repository = self.depot.create_repository(name, kind, description,
                                                  config)
        bottle.response.set_header("Location", "/api/v1/repositories/" + name)
        return json_response(self.describe(repository, detailed=True), 201)

    def show_repository(self, name):
        """GET /api/v1/repositories/<name>: 200 with what it holds; 404."""
        return json_response(self.describe(self.find_repository(name),
                                           detailed=True))

    def change_repository(self, name):
        """PATCH /api/v1/repositories/<name>: change description and config.

        200 with the repository; a change of ports moves the registry (the
        new port is bound before the old is let go); 400, 404, 409.
        """
        repository = self.find_repository(name)
        document = self.json_body(PATCH_FIELDS + ("name", "type"))
        for fixed in ("name", "type"):
            if fixed in document and document[fixed] != repository[fixed]:
                raise ApiError(400, "%s: cannot be changed" % fixed)
        description = repository["description"]
        if "description" in document:
            description = check_description(document["description"])
        config = repository["config"]
        if "config" in document:
            if not isinstance(document["config"], dict):
                raise ApiError(400, "config: must be an object")
            config = check_config(repository["type"],
                                  {**config, **document["config"]})
        repository = self.depot.change_repository(repository, description,
                                                  config)
        return json_response(self.describe(repository, detailed=True))

    def delete_repository(self, name):
        """DELETE /api/v1/repositories/<name>: 204; its servers stop at once."""
        self.depot.delete_repository(self.find_repository(name))
        bottle.response.status = 204
        return b""

    def raw_request(self, name, path=""):
        """/repository/<name>/<path>: raw files (see RawFiles)."""
        repository = self.find_repository(name)
        if repository["type"] != "raw":
            urls = [server["url"] for server in self.depot.registry_status(
                name, request_host()).values() if isinstance(server, dict)]
            raise ApiError(400, "repository %r is a docker repository; its "
                                "registry is served at %s"
                           % (name, " and ".join(urls) or "no port"))
        return self.raw.handle(repository, path)


def check_description(description):
    if not isinstance(description, str):
        raise ApiError(400, "description: must be a string")
    if len(description) > DESCRIPTION_LIMIT:
        raise ApiError(400, "description: longer than %d characters"
                       % DESCRIPTION_LIMIT)
    return description


def api_failure(error):
    """The ApiError that answers an unexpected exception in a handler."""
    full = storage_failure(error)
    if full is not None or isinstance(error, StorageFull):
        log.warning("storage full: %s", error)
        return ApiError(507, "the storage is full; free space and try again")
    if isinstance(error, BadBody):
        return ApiError(400, str(error))
    if isinstance(error, RangeNotSatisfiable):
        return ApiError(416, str(error), error.headers())
    if isinstance(error, ContentGone):
        return ApiError(404, "the file was deleted while being read")
    log.exception("internal error")
    return ApiError(500, "internal error: %s" % error)


def request_host():
    """The host name the client used to reach us, for URLs in answers."""
    host = bottle.request.environ.get("HTTP_HOST") or "localhost"
    if host.startswith("["):
        return host[:host.index("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _schema_ref(name):
    return {"$ref": "#/components/schemas/" + name}


def _answer(description, schema=None, headers=None):
    answer = {"description": description}
    if schema is not None:
        answer["content"] = {"application/json": {"schema": schema}}
    if headers:
        answer["headers"] = {header: {"schema": {"type": "string"}}
                             for header in headers}
    return answer


_ERROR = _answer("an error", _schema_ref("Error"))
_NAME_PARAMETER = {"name": "name", "in": "path", "required": True,
                   "schema": {"type": "string",
                              "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"}}

#: The management API as an OpenAPI 3.0 document, served at /api/v1/openapi.json.
OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "Depot management API", "version": __version__,
             "description": "Create, list, show, change and delete Depot "
                            "repositories."},
    "servers": [{"url": "/"}],
    "paths": {
        "/api/v1/health": {"get": {
            "summary": "Whether Depot and its database answer",
            "operationId": "health",
            "responses": {"200": _answer("healthy", _schema_ref("Health")),
                          "503": _answer("the database does not answer",
                                         _schema_ref("Health"))}}},
        "/api/v1/openapi.json": {"get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": _answer("the OpenAPI document",
                                         {"type": "object"})}}},
        "/api/v1/repositories": {
            "get": {
                "summary": "Every repository, sorted by name",
                "operationId": "listRepositories",
                "responses": {"200": _answer("the repositories", {
                    "type": "array", "items": _schema_ref("Repository")})}},
            "post": {
                "summary": "Create a repository",
                "operationId": "createRepository",
                "requestBody": {"required": True, "content": {
                    "application/json": {
                        "schema": _schema_ref("RepositoryInput")}}},
                "responses": {
                    "201": _answer("created", _schema_ref("Repository"),
                                   ["Location"]),
                    "400": _ERROR, "409": _ERROR, "413": _ERROR,
                    "507": _ERROR}}},
        "/api/v1/repositories/{name}": {
            "parameters": [_NAME_PARAMETER],
            "get": {
                "summary": "A repository and what it holds",
                "operationId": "showRepository",
                "responses": {"200": _answer("the repository",
                                             _schema_ref("Repository")),
                              "400": _ERROR, "404": _ERROR}},
            "patch": {
                "summary": "Change a repository's description or config",
                "operationId": "changeRepository",
                "requestBody": {"required": True, "content": {
                    "application/json": {
                        "schema": _schema_ref("RepositoryPatch")}}},
                "responses": {"200": _answer("the changed repository",
                                             _schema_ref("Repository")),
                              "400": _ERROR, "404": _ERROR, "409": _ERROR,
                              "413": _ERROR, "507": _ERROR}},
            "delete": {
                "summary": "Delete a repository and everything in it",
                "operationId": "deleteRepository",
                "responses": {"204": _answer("deleted"), "400": _ERROR,
                              "404": _ERROR}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"}}},
        "Health": {"type": "object",
                   "required": ["status", "version", "database"],
                   "properties": {"status": {"type": "string"},
                                  "version": {"type": "string"},
                                  "database": {"type": "string"}}},
        "Config": {
            "type": "object", "additionalProperties": False,
            "description": "For docker repositories: the registry's ports "
                           "(0 for none; both 0 serves it at /v2/ on the "
                           "main port). Raw repositories take no settings.",
            "properties": {
                "http_port": {"type": "integer", "minimum": 0,
                              "maximum": 65535},
                "https_port": {"type": "integer", "minimum": 0,
                               "maximum": 65535}}},
        "RepositoryInput": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "type"],
            "properties": {
                "name": {"type": "string",
                         "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
                "type": {"type": "string", "enum": list(REPOSITORY_TYPES)},
                "description": {"type": "string",
                                "maxLength": DESCRIPTION_LIMIT},
                "config": _schema_ref("Config")}},
        "RepositoryPatch": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "description": {"type": "string",
                                "maxLength": DESCRIPTION_LIMIT},
                "config": _schema_ref("Config")}},
        "Server": {
            "type": "object", "required": ["port", "url", "up"],
            "properties": {"port": {"type": "integer"},
                           "url": {"type": "string"},
                           "up": {"type": "boolean"},
                           "error": {"type": "string", "nullable": True}}},
        "Repository": {
            "type": "object",
            "required": ["name", "type", "description", "config",
                         "created_at", "updated_at"],
            "properties": {
                "name": {"type": "string"},
                "type": {"type": "string", "enum": list(REPOSITORY_TYPES)},
                "description": {"type": "string"},
                "config": {"type": "object"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "url": {"type": "string",
                        "description": "raw repositories: where files live"},
                "registry": {
                    "type": "object",
                    "description": "docker repositories: each server",
                    "additionalProperties": _schema_ref("Server")},
                "content": {
                    "type": "object",
                    "description": "what the repository holds: files and "
                                   "bytes, or images, tags, manifests, "
                                   "blobs and bytes",
                    "additionalProperties": True}}},
    }},
}


###############################################################################
# Servers #####################################################################
###############################################################################
#
# The main port serves the management API and raw files (and, when a docker
# repository has no ports of its own, its registry at /v2/). Every docker
# repository with ports has one cheroot server per port. ``Depot`` owns them
# all: it starts a repository's servers before its record is saved, moves
# them when its ports change, and stops them when it is deleted.

UNPRINTABLE = re.compile(r"[\x00-\x20\x7f-\xff]")


class AccessLog:
    """WSGI middleware: one log line per request, once its body has been sent."""

    def __init__(self, app, label):
        self.app, self.label = app, label

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        status = ["-"]

        def capture(line, headers, exc_info=None):
            status[0] = line.split(" ", 1)[0]
            return start_response(line, headers, exc_info)

        body = self.app(environ, capture)
        return LoggedBody(body, self.label, environ, status, started)


class LoggedBody:
    """A response body that counts its bytes and logs the request when closed."""

    def __init__(self, body, label, environ, status, started):
        self.body, self.label, self.environ = body, label, environ
        self.status, self.started, self.sent = status, started, 0

    def __iter__(self):
        for data in self.body:
            self.sent += len(data)
            yield data

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            environ = self.environ
            path = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
            # As the client sent it; what could forge a line is escaped.
            path = UNPRINTABLE.sub(lambda match: "%%%02X" % ord(match.group()),
                                   path)
            access_log.info(
                "%s %s %s %s %s %dB %.1fms", self.label,
                environ.get("REMOTE_ADDR", "-"), environ.get("REQUEST_METHOD"),
                path, self.status[0], self.sent,
                (time.perf_counter() - self.started) * 1000)


def error_connection(render):
    """A cheroot connection class whose own error answers are JSON.

    cheroot answers some requests before any app sees them (a malformed
    request line, headers over the limit) with a text/plain body; ``render``
    gives the surface's JSON body for a status and message instead.
    """
    class ErrorRequest(cheroot.server.HTTPRequest):
        def simple_response(self, status, msg=""):
            status = str(status)
            if int(status[:3]) < 400:
                return super().simple_response(status, msg)
            body, headers = render(int(status[:3]), msg or status[4:])
            lines = ["%s %s" % (self.server.protocol, status),
                     "Content-Type: application/json",
                     "Content-Length: %d" % len(body)]
            lines += ["%s: %s" % header for header in headers]
            if status[:3] in ("413", "414"):
                self.close_connection = True
                lines.append("Connection: close")
            head = "\r\n".join(lines).encode("ISO-8859-1") + b"\r\n\r\n"
            try:
                self.conn.wfile.write(head + body)
            except OSError as error:
                if error.args[0] not in cheroot.errors.socket_errors_to_ignore:
                    raise

    class ErrorConnection(cheroot.server.HTTPConnection):
        RequestHandlerClass = ErrorRequest

    return ErrorConnection


def render_api_error(status, message):
    return ApiError(status, message).body().encode(), []


def render_registry_error(status, message):
    code = "SIZE_INVALID" if status == 413 else "UNSUPPORTED"
    return (RegistryError(code, status, message).body().encode(),
            list(REGISTRY_HEADERS))


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def guard_paths(app, registry_port):
    """WSGI middleware: 400 for a path that is not UTF-8 or holds controls.

    Bottle drops bytes it cannot decode and its routes match before a
    trailing newline, so such a path could reach another resource than the
    one it names (``DELETE /api/v1/repositories/a%0A`` would delete ``a``).
    """
    def guarded(environ, start_response):
        path = environ.get("PATH_INFO", "")
        registry = registry_port or path.startswith("/v2")
        try:
            problem = None
            text = path.encode("latin1").decode("utf-8")
            # The registry checks names, tags and digests in full itself.
            if not registry and CONTROL_CHARACTERS.search(text):
                problem = "the path holds control characters"
        except UnicodeError:
            problem = "the path is not valid UTF-8"
        if problem is None:
            return app(environ, start_response)
        if registry:
            return wsgi_error(400, RegistryError("NAME_INVALID", 400, problem)
                              .body(), start_response, REGISTRY_HEADERS)
        return wsgi_error(400, ApiError(400, problem).body(), start_response)
    return guarded


class Listener:
    """One cheroot server on one port, serving a WSGI app from its own thread."""

    def __init__(self, app, host, port, tls, label, threads, registry=True):
        self.port, self.tls, self.label = port, tls, label
        render = render_registry_error if registry else render_api_error
        self.server = cheroot.wsgi.Server(
            (host, port), AccessLog(guard_paths(app, registry), label),
            numthreads=threads,
            server_name="depot", timeout=30, shutdown_timeout=5)
        self.server.max_request_header_size = 64 * 1024
        self.server.request_queue_size = 128
        self.server.ConnectionClass = error_connection(render)
        self.server.error_log = self.server_log
        if tls is not None:
            self.server.ssl_adapter = tls_adapter(*tls)
        self.thread = None

    @property
    def scheme(self):
        return "https" if self.tls else "http"

    def server_log(self, msg="", level=logging.INFO, traceback=False):
        """cheroot's own messages, mostly clients that went away, in one line.

        Tracebacks are kept for errors that are not a connection's fault.
        """
        error = sys.exc_info()[1] if traceback else None
        client_fault = error is None or isinstance(
            error, (OSError, ssl.SSLError, ValueError))
        if level >= logging.ERROR and not client_fault:
            log.error("%s: %s", self.label, msg, exc_info=True)
        else:
            log.debug("%s: %s%s", self.label, msg,
                      " (%s)" % error if error is not None else "")

    def start(self):
        """Bind the port (OSError when it cannot be had) and start serving."""
        self.server.prepare()
        self.thread = threading.Thread(target=self.server.serve,
                                       name=self.label, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.stop()
        if self.thread is not None:
            self.thread.join(10)


class RegistryService:
    """A docker repository's registry and the listeners that serve it."""

    def __init__(self, registry):
        self.registry = registry
        self.listeners = {}
        self.errors = {}

    def stop(self):
        for listener in self.listeners.values():
            listener.stop()
        self.listeners.clear()


def wsgi_error(status, body, start_response, headers=()):
    """Answer a bare WSGI request with an error body (JSON text)."""
    body = body.encode()
    start_response("%d %s" % (status, bottle.HTTP_CODES.get(status, "Error")), [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))), *headers])
    return [body]


class Depot:
    """The running appliance: store, servers, registries and the janitor."""

    def __init__(self, settings, store, tls):
        self.settings, self.store, self.tls = settings, store, tls
        self.registries = {}
        self.main_registry = None
        self.changes = threading.RLock()
        self.stopping = threading.Event()
        self.management = Management(self)
        self.main = None
        self.janitor = threading.Thread(target=self.run_janitor,
                                        name="janitor", daemon=True)

    # Life cycle ------------------------------------------------------------

    def start(self):
        """Start every registry, then the main server, then the janitor.

        The main port comes last, so that once the API answers, every
        registry that can be served is.
        """
        with self.store.read() as db:
            rows = db.execute(
                "SELECT id, name, type, description, config, created_at, "
                "updated_at FROM repository WHERE type = 'docker' "
                "ORDER BY name").fetchall()
        for row in rows:
            repository = repository_record(row)
            service = RegistryService(Registry(self, repository))
            self.registries[repository["name"]] = service
            self.bind_registry(service, repository, tolerate_failure=True)
        self.main = Listener(self.dispatch_main, self.settings.host,
                             self.settings.port, self.tls, "main",
                             self.settings.threads, registry=False)
        try:
            self.main.start()
        except OSError:
            for service in self.registries.values():
                service.stop()
            raise
        self.janitor.start()

    def stop(self):
        self.stopping.set()
        self.store.garbage.set()
        if self.main is not None:
            self.main.stop()
        for service in self.registries.values():
            service.stop()
        if self.janitor.is_alive():
            self.janitor.join(30)

    def dispatch_main(self, environ, start_response):
        """The main port's WSGI app: /v2/ to the registry mounted there."""
        path = environ.get("PATH_INFO", "")
        if path == "/v2" or path.startswith("/v2/"):
            service = self.registries.get(self.main_registry)
            if service is None:
                return wsgi_error(404, RegistryError(
                    "UNSUPPORTED", 404, "no docker repository is served on "
                    "this port; give one http_port and https_port 0").body(),
                    start_response,
                    list(REGISTRY_HEADERS))
            return service.registry.app(environ, start_response)
        return self.management.app(environ, start_response)

    # Registries ------------------------------------------------------------

    def bind_registry(self, service, repository, tolerate_failure=False):
        """Start the listeners that ``repository``'s config asks for.

        Ports already served by ``service`` are kept; new ones are bound
        first and the old ones let go after, so a move never leaves the
        registry unreachable. On failure nothing changes (ApiError 409),
        unless ``tolerate_failure``, when the failure is logged and kept in
        the service's status.
        """
        name, config = repository["name"], repository["config"]
        wanted = {scheme: config.get(scheme + "_port", 0)
                  for scheme in ("http", "https")}
        started = {}
        for scheme, port in wanted.items():
            current = service.listeners.get(scheme)
            if not port or (current is not None and current.port == port):
                continue
            listener = Listener(
                service.registry.app, self.settings.host, port,
                self.tls if scheme == "https" else None,
                "%s %s:%d" % (name, scheme, port), self.settings.threads)
            try:
                listener.start()
            except OSError as error:
                message = "port %d cannot be bound: %s" % (
                    port, error.strerror or error)
                if not tolerate_failure:
                    for other in started.values():
                        other.stop()
                    raise ApiError(409, "config.%s_port: %s" % (scheme, message))
                if service.errors.get(scheme) != message:
                    log.warning("registry %s: %s", name, message)
                service.errors[scheme] = message
                continue
            started[scheme] = listener
        for scheme, port in wanted.items():
            current = service.listeners.get(scheme)
            if current is not None and current.port != port:
                current.stop()
                del service.listeners[scheme]
            if scheme in started:
                service.listeners[scheme] = started[scheme]
                service.errors.pop(scheme, None)
        if not any(wanted.values()):
            self.main_registry = name
        elif self.main_registry == name:
            self.main_registry = None

    def registry_status(self, name, host):
        """Each server of a registry: port, URL, whether it is up, why not."""
        service = self.registries.get(name)
        if service is None:
            return {}
        if self.main_registry == name:
            return {"main": {"port": self.settings.port, "up": True,
                             "url": "https://%s:%d/v2/" % (
                                 host, self.settings.port), "error": None}}
        config = service.registry.repository["config"]
        status = {}
        for scheme in ("http", "https"):
            port = config.get(scheme + "_port", 0)
            if port:
                status[scheme] = {
                    "port": port, "url": "%s://%s:%d/v2/" % (scheme, host, port),
                    "up": scheme in service.listeners,
                    "error": service.errors.get(scheme)}
        return status

    def check_ports(self, name, config):
        """409 when the config's ports clash with Depot or another repository."""
        ports = [config.get("http_port", 0), config.get("https_port", 0)]
        for port in filter(None, ports):
            if port == self.settings.port:
                raise ApiError(409, "config: port %d is Depot's main port"
                               % port)
            for other, service in self.registries.items():
                other_config = service.registry.repository["config"]
                if other != name and port in (other_config.get("http_port"),
                                              other_config.get("https_port")):
                    raise ApiError(409, "config: port %d is used by repository "
                                        "%r" % (port, other))
        if not any(ports) and self.main_registry not in (None, name):
            raise ApiError(409, "config: repository %r is already served on "
                                "the main port; only one can be"
                           % self.main_registry)
        if name in self.registries:
            current = self.registries[name].registry.repository["config"]
            for scheme, other in (("http", "https"), ("https", "http")):
                port = config.get(scheme + "_port")
                if port and port == current.get(other + "_port") and \
                        port != current.get(scheme + "_port"):
                    raise ApiError(409, "config: port %d is this repository's "
                                        "%s port; move it in two steps"
                                   % (port, other))

    # Repositories ----------------------------------------------------------

    def create_repository(self, name, kind, description, config):
        """Save a new repository, its registry up first; returns its record."""
        with self.changes:
            with self.store.read() as db:
                if db.execute("SELECT 1 FROM repository WHERE name = ?",
                              (name,)).fetchone():
                    raise ApiError(409, "name: a repository named %r exists"
                                   % name)
            now = time.time()
            repository = {"id": None, "name": name, "type": kind,
                          "description": description, "config": config,
                          "created_at": now, "updated_at": now}
            service = None
            if kind == "docker":
                self.check_ports(name, config)
                service = RegistryService(Registry(self, repository))
                self.bind_registry(service, repository)
            try:
                with self.store.write(durable=True) as db:
                    db.execute(
                        "INSERT INTO repository (name, type, description, "
                        "config, created_at, updated_at) VALUES (?, ?, ?, ?, "
                        "?, ?)", (name, kind, description, json.dumps(config),
                                  now, now))
                    repository["id"] = db.last_insert_rowid()
            except BaseException:
                if service is not None:
                    service.stop()
                    if self.main_registry == name:
                        self.main_registry = None
                raise
            if service is not None:
                self.registries[name] = service
            log.info("repository %s (%s) created", name, kind)
            return repository

    def change_repository(self, repository, description, config):
        """Save a new description and config; move the registry's ports."""
        with self.changes:
            name = repository["name"]
            service = self.registries.get(name)
            changed = dict(repository, description=description, config=config,
                           updated_at=time.time())
            if service is not None and (config != repository["config"]
                                        or service.errors):
                self.check_ports(name, config)
                previous = service.registry.repository
                self.bind_registry(service, changed)
                try:
                    self.save_change(changed)
                except BaseException:
                    self.bind_registry(service, previous,
                                       tolerate_failure=True)
                    raise
                log.info("repository %s now served on %s", name,
                         ", ".join("%s:%d" % (scheme, listener.port) for
                                   scheme, listener in
                                   service.listeners.items()) or "main port")
            else:
                self.save_change(changed)
            if service is not None:
                service.registry.repository = changed
            return changed

    def save_change(self, repository):
        with self.store.write(durable=True) as db:
            db.execute("UPDATE repository SET description = ?, config = ?, "
                       "updated_at = ? WHERE id = ?",
                       (repository["description"],
                        json.dumps(repository["config"]),
                        repository["updated_at"], repository["id"]))

    def delete_repository(self, repository):
        """Stop a repository's servers and delete it with all it holds."""
        with self.changes:
            name = repository["name"]
            service = self.registries.pop(name, None)
            if service is not None:
                service.stop()
                if self.main_registry == name:
                    self.main_registry = None
            with self.store.write(durable=True) as db:
                db.execute("DELETE FROM repository WHERE id = ?",
                           (repository["id"],))
            self.store.garbage.set()
            log.info("repository %s deleted", name)

    def contents(self, repository):
        """What a repository holds, for the management API."""
        service = self.registries.get(repository["name"])
        if service is not None:
            return service.registry.contents()
        with self.store.read() as db:
            files, size = db.execute(
                "SELECT count(*), coalesce(sum(content.size), 0) FROM raw_file "
                "JOIN content ON content.id = raw_file.content_id "
                "WHERE repository_id = ?", (repository["id"],)).fetchone()
            stored, = db.execute(
                "SELECT coalesce(sum(size), 0) FROM content WHERE id IN "
                "(SELECT content_id FROM raw_file WHERE repository_id = ?)",
                (repository["id"],)).fetchone()
        return {"files": files, "bytes": size, "stored_bytes": stored}

    # Janitor ---------------------------------------------------------------

    def run_janitor(self):
        """Expire idle upload sessions and free unreferenced content."""
        while not self.stopping.is_set():
            try:
                self.retry_registries()
                self.expire_uploads()
                removed = self.store.collect_garbage()
                if removed:
                    log.info("freed the space of %d unreferenced contents",
                             removed)
            except Exception:
                log.exception("janitor run failed")
            # A short expiry is checked more often, so it holds to a second.
            self.store.garbage.wait(min(JANITOR_INTERVAL,
                                        max(self.settings.upload_expiry / 2, 1)))
            self.store.garbage.clear()

    def retry_registries(self):
        """Try again to bind the registry ports that could not be bound."""
        with self.changes:
            for name, service in list(self.registries.items()):
                if service.errors:
                    self.bind_registry(service, service.registry.repository,
                                       tolerate_failure=True)
                    if not service.errors:
                        log.info("registry %s is up again", name)

    def expire_uploads(self):
        cutoff = time.time() - self.settings.upload_expiry
        with self.store.write() as db:
            expired = [row[0] for row in db.execute(
                "SELECT id FROM upload WHERE updated_at < ?", (cutoff,))]
            db.execute("DELETE FROM upload WHERE updated_at < ?", (cutoff,))
        for session in expired:
            for service in list(self.registries.values()):
                service.registry.forget_session(session)
        if expired:
            log.info("removed %d upload sessions idle for more than %d s",
                     len(expired), self.settings.upload_expiry)


###############################################################################
# TLS #########################################################################
###############################################################################

def ensure_certificate(settings):
    """The (certificate, key) files to serve HTTPS with, made when missing.

    Without configured files Depot makes a self-signed certificate for
    localhost, 127.0.0.1, ::1 and the host name, kept in the data directory
    (key mode 0600) and reused on the next start.
    """
    if settings.cert_file or settings.key_file:
        if not (settings.cert_file and settings.key_file):
            raise SystemExit("give both a certificate and a key file, or neither")
        for path in (settings.cert_file, settings.key_file):
            if not os.path.isfile(path):
                raise SystemExit("TLS file %s does not exist" % path)
        return settings.cert_file, settings.key_file
    cert = os.path.join(settings.data_dir, "cert.pem")
    key = os.path.join(settings.data_dir, "key.pem")
    if not (os.path.exists(cert) and os.path.exists(key)):
        make_self_signed_certificate(cert, key)
        log.info("made a self-signed certificate: %s", cert)
    return cert, key


def make_self_signed_certificate(cert_path, key_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname()
    names = [x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    if hostname and hostname != "localhost":
        names.append(x509.DNSName(hostname))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            hostname or "localhost"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                            "Depot (self-signed)")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                       critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=False,
            content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256()))
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    with open(cert_path, "wb") as file:
        file.write(certificate.public_bytes(serialization.Encoding.PEM))


def certificate_fingerprint(cert_path):
    """The SHA-256 fingerprint of a PEM certificate, as colon-separated hex."""
    with open(cert_path, "rb") as file:
        der = ssl.PEM_cert_to_DER_cert(file.read().decode("ascii"))
    return ":".join("%02X" % byte for byte in hashlib.sha256(der).digest())


def tls_adapter(cert, key):
    """A cheroot TLS adapter that speaks TLS 1.2 and newer only."""
    adapter = BuiltinSSLAdapter(cert, key)
    adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
    return adapter


###############################################################################
# Command line ################################################################
###############################################################################

def lock_data(settings):
    """Hold an exclusive lock beside the database; exit when another Depot has it."""
    path = settings.db_path + ".lock"
    file = open(path, "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        raise SystemExit("another Depot (pid %s) is already using %s; stop it "
                         "first or give this one another data directory"
                         % (holder, settings.db_path)) from None
    file.seek(0)
    file.truncate()
    file.write(str(os.getpid()))
    file.flush()
    return file


def shown_host(host):
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostname() or "localhost"
    return "[%s]" % host if ":" in host else host


def log_banner(depot, cert):
    settings = depot.settings
    host = shown_host(settings.host)
    log.info("Depot %s", __version__)
    log.info("data directory: %s", settings.data_dir)
    log.info("database: %s", settings.db_path)
    log.info("certificate: %s (SHA-256 fingerprint %s)", cert,
             certificate_fingerprint(cert))
    base = "https://%s:%d" % (host, settings.port)
    log.info("management API: %s/api/v1/", base)
    log.info("raw files: %s/repository/<name>/", base)
    for name in sorted(depot.registries):
        for server in depot.registry_status(name, host).values():
            log.info("registry %s: %s%s", name, server["url"],
                     "" if server["up"] else " (down: %s)" % server["error"])


def limit_malloc_arenas():
    """Keep glibc from holding freed chunk buffers in many per-thread arenas.

    Each thread that allocates 1 MiB buffers may get an arena of its own,
    which keeps freed memory: resident memory crept to 118 MiB over the
    benchmark's rounds, and stays under 75 MiB with two arenas. (Holding the
    mmap threshold low instead made every buffer a fresh mapping and a pull
    cost four times the CPU.)
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)   # M_ARENA_MAX
    except (OSError, AttributeError):
        pass   # not glibc: nothing to tune


def main(argv=None):
    settings = Settings.from_command_line(argv)
    limit_malloc_arenas()
    logging.basicConfig(
        level=settings.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        os.makedirs(settings.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(settings.db_path), exist_ok=True)
        lock = lock_data(settings)
        cert, key = ensure_certificate(settings)
        tls_adapter(cert, key)
        store = Store(settings.db_path, settings.durability)
    except ssl.SSLError as error:
        raise SystemExit("the certificate %s or its key %s cannot be used: %s"
                         % (cert, key, error)) from None
    except (OSError, apsw.Error) as error:
        raise SystemExit("cannot open Depot's data: %s" % error) from None
    depot = Depot(settings, store, (cert, key))
    stop = threading.Event()

    def request_stop(number, _frame):
        log.info("%s received, stopping", signal.Signals(number).name)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        depot.start()
    except OSError as error:
        store.close()
        raise SystemExit("cannot listen on %s:%d: %s" % (
            settings.host, settings.port, error.strerror or error)) from None
    log_banner(depot, cert)
    while not stop.wait(1):
        pass
    depot.stop()
    store.close()
    lock.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
