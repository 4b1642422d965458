"""The PostgreSQL backend: events in a table, schema migrations, the shared assignment.

    from trainer.store.postgres import PostgresStore, read_comparisons
    with PostgresStore("postgresql://me@db:5432/votes") as store:   # migrates the schema
        ok, voters = store.claim(pair_id, "alice", want=2, lease_s=1800)
        if ok:
            store.vote(record, want=2)         # returns once the transaction committed
    votes = read_comparisons("postgresql://me@db:5432/votes")       # same table as a directory's

Several `preflab serve` processes share one database; what makes that safe:

* Acknowledged = committed. Every event goes in with `ON CONFLICT (event_id) DO
  NOTHING`, so running a write again is harmless: a retried append returns the stored
  record and never duplicates. That is what lets us retry a transaction whose
  connection broke (PostgreSQL restarted, a network blip) on a fresh connection for up
  to `retry_s` seconds, even when we cannot tell whether the COMMIT got through.
  After that: StoreWriteError "... not saved, try again".
* The assignment (overlap K, never twice) lives in the database: `claim` and `vote`
  lock the pair's row in `pair_slots` (SELECT ... FOR UPDATE), so everything that
  decides about one pair queues up, in every server, while other pairs go on in
  parallel. Leases expire by the database's clock, so servers never disagree on time.
* `changes_since(cursor)` tells a server what the other servers stored. The cursor is
  a PostgreSQL snapshot (`pg_current_snapshot()`, opaque text), not a sequence number:
  `seq` values are taken at INSERT but become visible at COMMIT, in another order, so
  "seq > last seen" would miss a slow transaction's event forever. "Not visible in the
  previous snapshot, visible now" hands out each committed event exactly once.

Reading goes through COPY ... TO STDOUT (CSV) straight into pyarrow's CSV reader, then
the same `standing_votes` as the directory reader: same schema, same retractions.
Tables and migrations: trainer/store/postgres_schema.py; connecting, the pool and its
retries, and the one-line reasons a connection failed: trainer/store/postgres_connect.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv

from trainer.store.errors import (
    StoreError,
    StorePermissionError,
    StoreUnavailable,
    VoteConflict,
)
from trainer.store.postgres_connect import RetryingPool, connect, explain
from trainer.store.postgres_schema import VOTE_CONFLICT, has_events_table, migrate
from trainer.store.record import (
    FIELDS,
    FLAG_KINDS,
    SCHEMA,
    RecordError,
    check_columns,
    complete_record,
    empty_table,
    retract_record,
    standing_votes,
    validate_record,
)
from trainer.store.targets import describe

try:  # the optional extra `preflab[postgres]`
    import psycopg
    from psycopg.types.json import Jsonb
except ImportError:  # pragma: no cover - reported when a database is first opened
    psycopg = None

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TEXT_FIELDS = [f.name for f in SCHEMA if pa.types.is_string(f.type)]


def _column(name: str) -> str:
    """How a field is read: created_at as exact integer microseconds (what
    validate_record returns), the rest as they are. "left" is an SQL keyword: quote all."""
    if name == "created_at":
        return "round(extract(epoch FROM created_at) * 1000000)::int8 AS created_at"
    return f'"{name}"'


_INSERT_COLUMNS = ", ".join(f'"{f}"' for f in FIELDS)
_SELECT_COLUMNS = ", ".join(_column(f) for f in FIELDS)
# The columns' PostgreSQL types, for binary COPY (postgres_schema.py's events table).
_COPY_TYPES = [
    {"schema_version": "int2", "strength": "int2", "decision_ms": "int4", "created_at": "timestamptz"}.get(
        f, "text"
    )
    for f in FIELDS
]


def _row_values(rec: dict[str, Any]) -> tuple:
    """A validated record as the row it is inserted as (created_at exact to the µs)."""
    return tuple(EPOCH + timedelta(microseconds=rec[f]) if f == "created_at" else rec[f] for f in FIELDS)


def _as_record(row: tuple) -> dict[str, Any]:
    return dict(zip(FIELDS, row))


# --------------------------------------------------------------------------------------
# Reading: COPY into Arrow
# --------------------------------------------------------------------------------------


class _CopyStream(io.RawIOBase):
    """The rows of a `COPY ... TO STDOUT` as a readable byte stream, for pyarrow."""

    def __init__(self, copy):
        self._copy, self._pending, self._done, self.bytes_read = copy, bytearray(), False, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wanted = len(buffer)
        read = self._copy.read
        while len(self._pending) < wanted and not self._done:
            block = read()  # one row per call: libpq hands COPY data over row by row
            if not block:
                self._done = True
            self._pending += block
        n = min(wanted, len(self._pending))
        buffer[:n] = self._pending[:n]
        del self._pending[:n]
        self.bytes_read += n
        return n


def _copy_to_arrow(conn, fields: list[str], clause: str = "") -> pa.Table:
    """Events (only `fields`, those `clause` picks and orders, a constant SQL tail) as an
    Arrow table with SCHEMA's types for those fields."""
    schema = pa.schema([SCHEMA.field(f) for f in fields])
    types = {f: pa.int64() if f == "created_at" else SCHEMA.field(f).type for f in fields}
    options = dict(
        read_options=pa_csv.ReadOptions(column_names=fields, block_size=1 << 24),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        # PostgreSQL's CSV writes NULL as nothing and an empty string as "": only the
        # unquoted empty field is null (never "NA" and friends, pyarrow's defaults).
        convert_options=pa_csv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    )
    select = f"SELECT {', '.join(_column(f) for f in fields)} FROM events {clause}"
    query = f"COPY ({select}) TO STDOUT (FORMAT csv)"
    with conn.cursor() as cur, cur.copy(query) as copy:
        stream = _CopyStream(copy)
        try:
            table = pa_csv.read_csv(stream, **options)
        except pa.ArrowInvalid:
            if stream.bytes_read == 0:  # no events: pyarrow calls an empty input an error
                return empty_table().select(fields)
            raise
    return table.cast(schema)


def _read(target: str, fields: list[str] | None, clause: str = "") -> pa.Table:
    fields = list(fields or FIELDS)
    # Outside the try: connect's StoreUnavailable (no server, or no psycopg at all, where
    # the except clauses below could not even be evaluated) goes out as it is.
    conn = connect(target, 5.0)
    try:
        with conn:
            if not has_events_table(conn):  # a database never opened as a store: nothing in it
                return empty_table().select(fields)
            return _copy_to_arrow(conn, fields, clause)
    except psycopg.errors.InsufficientPrivilege as e:
        raise StorePermissionError(
            f"{describe(target)}: permission denied reading the votes "
            f"({e.diag.message_primary}); grant this role SELECT on the store's tables"
        ) from None
    except psycopg.Error as e:
        raise StoreUnavailable(
            f"{describe(target)}: reading the votes failed: {explain(e, target)}"
        ) from None


def read_events(target: str, columns: list[str] | None = None) -> pa.Table:
    """Every event in the database (votes, retracts and flag events), unordered, with SCHEMA;
    `columns`: only these (the others are never sent by the server)."""
    return _read(target, columns)


# Flag events in `seq` order: one sequence for every server, so two servers' clocks
# (created_at) cannot reorder an admin's decisions. Only the flag rows travel.
_FLAG_CLAUSE = "WHERE kind IN (" + ", ".join(f"'{k}'" for k in FLAG_KINDS) + ") ORDER BY seq"


def read_flag_events(target: str, columns: list[str] | None = None) -> pa.Table:
    """The flag events, in the order the database stored them (`seq`); `columns`: only these."""
    return _read(target, columns, _FLAG_CLAUSE)


def read_comparisons(target: str, columns: list[str] | None = None) -> pa.Table:
    """The standing votes, retractions applied; `columns`: only these, in this order
    (the others are never sent by the server)."""
    return standing_votes([_read(target, check_columns(columns))], columns)


# --------------------------------------------------------------------------------------
# The writer, and the shared assignment
# --------------------------------------------------------------------------------------


class PostgresStore:
    """A writer on a PostgreSQL store, with a connection pool. Thread-safe: share one
    per process.

    connect_timeout: seconds to wait for the server when connecting; retry_s: how long
    a write whose connection broke is retried before StoreWriteError."""

    recovered_events = 0  # the database replays its own journal; nothing for us to do

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        connect_timeout: float = 5.0,
        retry_s: float = 15.0,
    ):
        self.target = url
        with connect(url, connect_timeout) as conn:  # first contact: clear errors, then the schema
            try:
                migrate(conn, describe(url))
            except psycopg.Error as e:  # e.g. a role that may not create tables
                raise StoreError(
                    f"{describe(url)}: cannot set up the store's tables: {e.diag.message_primary or e}"
                ) from None
        self._pool = RetryingPool(
            url, min_size=min_size, max_size=max_size, connect_timeout=connect_timeout, retry_s=retry_s
        )

    def _validated(self, record: dict[str, Any], where: str = "") -> dict[str, Any]:
        rec = validate_record(complete_record(record), where)
        for f in _TEXT_FIELDS:  # the one thing Parquet takes and PostgreSQL text does not
            if rec[f] is not None and "\x00" in rec[f]:
                raise RecordError(f, "contains a NUL character, which PostgreSQL text cannot hold", where)
        return rec

    @staticmethod
    def _stored(conn, event_ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = conn.execute(f"SELECT {_SELECT_COLUMNS} FROM events WHERE event_id = ANY(%s)", (event_ids,))
        return {r["event_id"]: r for r in map(_as_record, rows)}

    @staticmethod
    def _insert(conn, rec: dict[str, Any]) -> dict[str, Any]:
        """Insert one validated event; if its event_id is already there, the stored one."""
        placeholders = ", ".join(["%s"] * len(FIELDS))
        inserted = conn.execute(
            f"INSERT INTO events ({_INSERT_COLUMNS}) VALUES ({placeholders}) "
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            _row_values(rec),
        ).fetchone()
        return rec if inserted else PostgresStore._stored(conn, [rec["event_id"]])[rec["event_id"]]

    @staticmethod
    def _copy_in(conn, table: str, recs: list[dict[str, Any]]) -> None:
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY {table} ({_INSERT_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(_COPY_TYPES)
            for rec in recs:
                copy.write_row(_row_values(rec))

    # ---- the store interface (the same as the directory writer's) --------------------

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Validate and commit one event; returns the stored record (created_at in µs)."""
        rec = self._validated(record)
        return self._pool.run(lambda conn: self._insert(conn, rec), f"event {rec['event_id']}")

    def append_many(self, records: Iterable[dict[str, Any]], where: str = "") -> list[dict[str, Any]]:
        """Validate every record first, then commit them all in one transaction (COPY).
        Nothing is stored unless all are valid; event_ids already stored are kept as
        they are (and returned as stored)."""
        prefix = f"{where} " if where else ""
        recs = [self._validated(r, f"{prefix}item {i}") for i, r in enumerate(records)]
        if not recs:
            return []

        def work(conn):
            with conn.transaction():
                try:  # the usual case, all new: straight into the table (one pass, not two)
                    with conn.transaction():  # a savepoint, so a clash undoes just this
                        self._copy_in(conn, "events", recs)
                    return recs
                except psycopg.errors.UniqueViolation:
                    pass
                # Some are stored already (a retry, a rerun copy): through a scratch table.
                conn.execute(
                    f"CREATE TEMP TABLE preflab_incoming ON COMMIT DROP AS "
                    f"SELECT {_INSERT_COLUMNS} FROM events WITH NO DATA"
                )
                self._copy_in(conn, "preflab_incoming", recs)
                inserted = {
                    row[0]
                    for row in conn.execute(
                        f"INSERT INTO events ({_INSERT_COLUMNS}) SELECT {_INSERT_COLUMNS} FROM preflab_incoming "
                        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
                    )
                }
                if len(inserted) == len(recs):
                    return recs
                stored = self._stored(conn, [r["event_id"] for r in recs if r["event_id"] not in inserted])
                return [stored.get(r["event_id"], r) for r in recs]

        return self._pool.run(work, f"{len(recs)} events")

    def retract(
        self, event_id: str, annotator: str, vote: dict[str, Any] | None = None, **pair_fields: Any
    ) -> dict[str, Any]:
        """Cancel an earlier vote with a `retract` event (record.retract_record)."""
        return self.append(retract_record(event_id, annotator, vote, **pair_fields))

    def flush(self) -> None:
        """Nothing to do: every acknowledged event is already committed."""

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the shared assignment (its rules: preflab_claim, preflab_vote in postgres_schema.py)

    def claim(self, pair_id: str, annotator: str, want: int, lease_s: float) -> tuple[bool, set[str]]:
        """Lease one of the pair's `want` slots to `annotator` for `lease_s` seconds.

        True when leased now, or they already hold a live lease on it. False when they
        have a standing vote on it, skipped it, or the standing votes and others' live
        leases fill it. Also returns the pair's standing voters (imports left out)."""
        ok, voters = self._pool.run(
            lambda conn: conn.execute(
                "SELECT ok, voters FROM preflab_claim(%s, %s, %s, %s)",
                (pair_id, annotator, want, float(lease_s)),
            ).fetchone(),
            f"claim of {pair_id} for {annotator}",
        )
        return ok, set(voters)

    def release(self, pair_id: str, annotator: str) -> None:
        """Drop the annotator's lease on the pair (a cancelled vote): the slot is free."""
        self._pool.run(
            lambda conn: conn.execute(
                "DELETE FROM leases WHERE pair_id = %s AND annotator = %s", (pair_id, annotator)
            ),
            f"release of {pair_id} by {annotator}",
        )

    def skip(self, pair_id: str, annotator: str) -> None:
        """Drop their lease and remember the skip: they never get this pair again."""
        self._pool.run(
            lambda conn: conn.execute(
                "WITH released AS (DELETE FROM leases WHERE pair_id = %(pair)s AND annotator = %(who)s) "
                "INSERT INTO skips (pair_id, annotator) VALUES (%(pair)s, %(who)s) ON CONFLICT DO NOTHING",
                {"pair": pair_id, "who": annotator},
            ),
            f"skip of {pair_id} by {annotator}",
        )

    def skipped(self) -> set[tuple[str, str]]:
        """Every (pair_id, annotator) skip, for a restarted server."""
        rows = self._pool.run(
            lambda conn: conn.execute("SELECT pair_id, annotator FROM skips").fetchall(),
            "reading skips",
            reading=True,
        )
        return {(p, a) for p, a in rows}

    def vote(self, record: dict[str, Any], want: int) -> dict[str, Any]:
        """Store a vote if the pair has room for it, in one transaction; returns the
        stored record once committed.

        VoteConflict (nothing stored) when the annotator already has a standing vote on
        the pair, or when the pair is full: without a live lease of their own, standing
        votes plus others' live leases reach `want`; with one, standing votes do. A
        retry of an event already committed returns it (no conflict)."""
        rec = self._validated(record)
        if rec["kind"] != "vote":
            raise ValueError(f"vote() takes a vote, got kind {rec['kind']!r}: use retract()")
        # As JSON for preflab_vote; created_at as an ISO string, exact to the µs.
        as_json = Jsonb(
            {**rec, "created_at": (EPOCH + timedelta(microseconds=rec["created_at"])).isoformat()}
        )

        def work(conn):
            try:
                stored_now = conn.execute("SELECT preflab_vote(%s, %s)", (as_json, want)).fetchone()[0]
            except psycopg.DatabaseError as e:
                if e.sqlstate == VOTE_CONFLICT:
                    raise VoteConflict(e.diag.message_primary) from None
                raise
            return rec if stored_now else self._stored(conn, [rec["event_id"]])[rec["event_id"]]

        return self._pool.run(work, f"vote {rec['event_id']}")

    # ---- what the other servers did ----------------------------------------------------

    def cursor(self) -> str:
        """A cursor for "now": changes_since(it) returns what is committed after this."""
        return self._pool.run(
            lambda conn: conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0],
            "reading the cursor",
            reading=True,
        )

    def changes_since(self, cursor: str | int | None) -> tuple[list[dict[str, Any]], str]:
        """Events committed since `cursor` (0 or None: all), as records in `seq` order,
        each with its `seq` too; and the cursor to pass next time. Each committed event
        comes back exactly once over a chain of calls. Commit order is not seq order: an
        event may come back after ones with a higher seq (the queue keeps the highest seq
        of each annotator's flag events, annotate/queue_flags.py)."""

        def work(conn):
            with conn.transaction():
                # REPEATABLE READ: one snapshot for both statements, so rows and cursor agree.
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                now = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
                if not cursor:
                    rows = conn.execute(f"SELECT {_SELECT_COLUMNS}, seq FROM events ORDER BY seq")
                else:  # committed since: not visible in the cursor's snapshot, visible in ours
                    rows = conn.execute(
                        f"SELECT {_SELECT_COLUMNS}, seq FROM events "
                        "WHERE txid >= pg_snapshot_xmin(%(c)s::pg_snapshot) "
                        "AND NOT pg_visible_in_snapshot(txid, %(c)s::pg_snapshot) ORDER BY seq",
                        {"c": str(cursor)},
                    )
                return [_as_record(r[:-1]) | {"seq": r[-1]} for r in rows], now

        return self._pool.run(work, "reading changes", reading=True)

    def flag_events(self) -> list[dict[str, Any]]:
        """The flag events as records in `seq` order (read_flag_events' order), each with
        its `seq`: what a starting server's queue learns, so that an older decision
        committed later (coming with sync) cannot override a newer one."""

        def work(conn):
            rows = conn.execute(f"SELECT {_SELECT_COLUMNS}, seq FROM events {_FLAG_CLAUSE}")
            return [_as_record(r[:-1]) | {"seq": r[-1]} for r in rows]

        return self._pool.run(work, "reading the flag events", reading=True)

    def snapshot(self, columns: list[str] | None = None) -> tuple[pa.Table, str]:
        """The standing votes and the cursor of the same instant, for a starting server:
        changes_since(cursor) then continues exactly where this table ends."""

        def work(conn):
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                now = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
                return _copy_to_arrow(conn, list(check_columns(columns) or FIELDS)), now

        table, now = self._pool.run(work, "reading the store", reading=True)
        return standing_votes([table], columns), now
