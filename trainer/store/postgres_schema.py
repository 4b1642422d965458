"""The PostgreSQL backend's tables, and how a database is brought up to date.

    from trainer.store.postgres_schema import migrate
    migrate(conn, target)       # idempotent; safe when several servers start at once

MIGRATIONS is an ordered list; entry i (counting from 1) turns schema version i-1 into
version i, and `preflab_schema_version` holds one row per version applied. `migrate`
applies what is missing in ONE transaction under a transaction-scoped advisory lock, so
two servers starting together never both create a table: the second waits, then finds
the work done. A database newer than this code is refused rather than guessed at.
Never edit an entry once released; append a new one.

The tables:
* events       one row per record (docs/design.md's fields, the same names and types;
               version 2 added subject, detail and criteria, and flag events;
               version 3 conversation_a and conversation_b), plus
               `seq` (insertion order) and `txid` (the writing transaction, which lets
               `changes_since` hand each event out exactly once; see postgres.py).
* pair_slots   one row per pair that was ever claimed: the row the shared assignment
               locks (SELECT ... FOR UPDATE) so that claims and votes on one pair queue
               up while other pairs go on in parallel.
* leases       who holds a slot of a pair, and until when (server clock).
* skips        pairs an annotator gave back; they never get that pair again.

And the shared assignment's rules, as functions (preflab_claim, preflab_vote): each is
one statement, so one round trip and one transaction, under the pair's row lock.
"""

from __future__ import annotations

from trainer.store.errors import StoreError

# Any constant works: it only has to be the same for every preflab process.
MIGRATION_LOCK = 0x70726566  # "pref"

# preflab_vote as migrations 3 and 5 define it, storing COLUMNS (each record schema
# version adds some): a vote goes in only while its pair still wants votes and the
# annotator has none standing on it; a refusal raises PF409 (VOTE_CONFLICT).
_VOTE_FUNCTION = """CREATE OR REPLACE FUNCTION preflab_vote(p_event jsonb, p_want integer) RETURNS boolean
        LANGUAGE plpgsql AS $$
        DECLARE
            v_pair text := p_event->>'pair_id';
            v_who  text := p_event->>'annotator';
            voters text[];
            leased text[];
        BEGIN
            PERFORM preflab_lock_pair(v_pair);
            IF EXISTS (SELECT 1 FROM events WHERE event_id = p_event->>'event_id') THEN
                RETURN false;
            END IF;
            SELECT s.voters, s.leased INTO voters, leased FROM preflab_pair_state(v_pair, v_who) s;
            IF v_who = ANY(voters) THEN
                RAISE EXCEPTION USING ERRCODE = 'PF409',
                    MESSAGE = format('%s already has a standing vote on %s', v_who, v_pair);
            END IF;
            -- With a live lease of their own the slot is theirs and only standing votes
            -- can fill the pair; without one, the others' live leases hold slots too.
            IF cardinality(voters) + (CASE WHEN v_who = ANY(leased) THEN 0 ELSE cardinality(leased) END) >= p_want THEN
                RAISE EXCEPTION USING ERRCODE = 'PF409',
                    MESSAGE = format('%s already has the %s votes it wants', v_pair, p_want);
            END IF;
            INSERT INTO events (COLUMNS)
            SELECT COLUMNS
            FROM jsonb_populate_record(NULL::events, p_event)
            ON CONFLICT (event_id) DO NOTHING;   -- a plain append() of the same event got there first
            IF NOT FOUND THEN
                RETURN false;
            END IF;
            DELETE FROM leases WHERE pair_id = v_pair AND annotator = v_who;
            RETURN true;
        END $$"""
# The event columns of record schema version 2 (migration 3's); version 3 adds the conversations.
_COLUMNS_V2 = (
    "schema_version, event_id, kind, retracts, pair_id, prompt_id, prompt, response_a, response_b, model_a, "
    'model_b, "left", choice, strength, rationale, annotator, created_at, decision_ms, gen_params, subject, '
    "detail, criteria"
)


MIGRATIONS: list[list[str]] = [
    # 1: the record, and the shared assignment
    [
        """CREATE TABLE events (
            seq            bigserial   NOT NULL UNIQUE,
            txid           xid8        NOT NULL DEFAULT pg_current_xact_id(),
            schema_version smallint    NOT NULL,
            event_id       text        PRIMARY KEY,
            kind           text        NOT NULL CHECK (kind IN ('vote', 'retract')),
            retracts       text,
            pair_id        text        NOT NULL,
            prompt_id      text        NOT NULL,
            prompt         text        NOT NULL,
            response_a     text        NOT NULL,
            response_b     text        NOT NULL,
            model_a        text        NOT NULL,
            model_b        text        NOT NULL,
            "left"         text        NOT NULL,
            choice         text,
            strength       smallint,
            rationale      text,
            annotator      text        NOT NULL,
            created_at     timestamptz NOT NULL,
            decision_ms    integer,
            gen_params     text
        )""",
        "CREATE INDEX events_pair_id ON events (pair_id)",
        "CREATE INDEX events_annotator ON events (annotator)",
        "CREATE INDEX events_txid ON events (txid)",
        "CREATE INDEX events_retracts ON events (retracts) WHERE retracts IS NOT NULL",
        "CREATE TABLE pair_slots (pair_id text PRIMARY KEY)",
        """CREATE TABLE leases (
            pair_id    text        NOT NULL,
            annotator  text        NOT NULL,
            leased_at  timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz NOT NULL,
            PRIMARY KEY (pair_id, annotator)
        )""",
        """CREATE TABLE skips (
            pair_id    text        NOT NULL,
            annotator  text        NOT NULL,
            skipped_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (pair_id, annotator)
        )""",
        # The standing voters of a pair (imports are nobody's work here), its live
        # leases, and whether p_who skipped it: all that a claim or a vote decides on.
        """CREATE FUNCTION preflab_pair_state(p_pair text, p_who text,
                                              OUT voters text[], OUT leased text[], OUT skipped boolean)
        LANGUAGE sql STABLE AS $$
            SELECT ARRAY(SELECT DISTINCT v.annotator FROM events v
                         WHERE v.pair_id = p_pair AND v.kind = 'vote' AND NOT starts_with(v.annotator, 'import:')
                           AND NOT EXISTS (SELECT 1 FROM events r
                                           WHERE r.retracts = v.event_id AND r.kind = 'retract')),
                   ARRAY(SELECT l.annotator FROM leases l WHERE l.pair_id = p_pair AND l.expires_at > now()),
                   EXISTS(SELECT 1 FROM skips k WHERE k.pair_id = p_pair AND k.annotator = p_who)
        $$""",
        # The pair's slot row lock, creating the row the first time: every claim and
        # vote on one pair, from any server, waits here for the one before it, and then
        # (READ COMMITTED: a new snapshot per statement) sees what that one committed.
        """CREATE FUNCTION preflab_lock_pair(p_pair text) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM 1 FROM pair_slots WHERE pair_id = p_pair FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO pair_slots (pair_id) VALUES (p_pair) ON CONFLICT DO NOTHING;
                PERFORM 1 FROM pair_slots WHERE pair_id = p_pair FOR UPDATE;
            END IF;
        END $$""",
        # Lease one of the pair's p_want slots to p_who (see PostgresStore.claim).
        """CREATE FUNCTION preflab_claim(p_pair text, p_who text, p_want integer, p_lease_s double precision,
                                         OUT ok boolean, OUT voters text[])
        LANGUAGE plpgsql AS $$
        DECLARE
            leased text[];
            skipped boolean;
        BEGIN
            -- A lease is a reservation, not data: losing the newest ones in a crash only
            -- frees their slots (a vote then needs room again), so no wait for the disk.
            PERFORM set_config('synchronous_commit', 'off', true);
            PERFORM preflab_lock_pair(p_pair);
            SELECT s.voters, s.leased, s.skipped INTO voters, leased, skipped FROM preflab_pair_state(p_pair, p_who) s;
            IF p_who = ANY(voters) OR skipped THEN
                ok := false;
            ELSIF p_who = ANY(leased) THEN
                ok := true;
            ELSIF cardinality(voters) + cardinality(leased) >= p_want THEN
                ok := false;
            ELSE
                INSERT INTO leases (pair_id, annotator, expires_at)
                VALUES (p_pair, p_who, now() + make_interval(secs => p_lease_s))
                ON CONFLICT (pair_id, annotator) DO UPDATE SET leased_at = now(), expires_at = excluded.expires_at;
                ok := true;
            END IF;
        END $$""",
        # Store one vote (a record as JSON) if its pair has room (see PostgresStore.vote).
        # True: stored now; false: this event_id was stored before (a retry whose first
        # try committed). A refusal raises SQLSTATE PF409 and stores nothing.
        """CREATE FUNCTION preflab_vote(p_event jsonb, p_want integer) RETURNS boolean
        LANGUAGE plpgsql AS $$
        DECLARE
            v_pair text := p_event->>'pair_id';
            v_who  text := p_event->>'annotator';
            voters text[];
            leased text[];
        BEGIN
            PERFORM preflab_lock_pair(v_pair);
            IF EXISTS (SELECT 1 FROM events WHERE event_id = p_event->>'event_id') THEN
                RETURN false;
            END IF;
            SELECT s.voters, s.leased INTO voters, leased FROM preflab_pair_state(v_pair, v_who) s;
            IF v_who = ANY(voters) THEN
                RAISE EXCEPTION USING ERRCODE = 'PF409',
                    MESSAGE = format('%s already has a standing vote on %s', v_who, v_pair);
            END IF;
            -- With a live lease of their own the slot is theirs and only standing votes
            -- can fill the pair; without one, the others' live leases hold slots too.
            IF cardinality(voters) + (CASE WHEN v_who = ANY(leased) THEN 0 ELSE cardinality(leased) END) >= p_want THEN
                RAISE EXCEPTION USING ERRCODE = 'PF409',
                    MESSAGE = format('%s already has the %s votes it wants', v_pair, p_want);
            END IF;
            INSERT INTO events (schema_version, event_id, kind, retracts, pair_id, prompt_id, prompt, response_a,
                                response_b, model_a, model_b, "left", choice, strength, rationale, annotator,
                                created_at, decision_ms, gen_params)
            SELECT schema_version, event_id, kind, retracts, pair_id, prompt_id, prompt, response_a,
                   response_b, model_a, model_b, "left", choice, strength, rationale, annotator,
                   created_at, decision_ms, gen_params
            FROM jsonb_populate_record(NULL::events, p_event)
            ON CONFLICT (event_id) DO NOTHING;   -- a plain append() of the same event got there first
            IF NOT FOUND THEN
                RETURN false;
            END IF;
            DELETE FROM leases WHERE pair_id = v_pair AND annotator = v_who;
            RETURN true;
        END $$""",
    ],
    # 2: record schema version 2 (trainer/store/record.py), additive: flag events (about an
    # annotator, not a pair: the pair columns may be null) and their two new columns.
    # Version-1 rows are untouched; preflab_vote and the assignment only ever look at
    # kind = 'vote' and 'retract'.
    [
        "ALTER TABLE events ADD COLUMN subject text, ADD COLUMN detail text",
        *(
            f'ALTER TABLE events ALTER COLUMN "{column}" DROP NOT NULL'
            for column in (
                "pair_id",
                "prompt_id",
                "prompt",
                "response_a",
                "response_b",
                "model_a",
                "model_b",
                "left",
            )
        ),
        "ALTER TABLE events DROP CONSTRAINT events_kind_check",
        """ALTER TABLE events ADD CONSTRAINT events_kind_check
            CHECK (kind IN ('vote', 'retract', 'flag', 'flag_confirm', 'flag_clear'))""",
        # Reading the flags must not scan every vote: they are few.
        "CREATE INDEX events_flags ON events (subject) WHERE subject IS NOT NULL",
    ],
    # 3: record schema version 2's `criteria` (a vote's rubric judgments, annotate/rubric.py),
    # additive and nullable; preflab_vote learns to store it (and the version-2 columns,
    # which a vote leaves null today).
    [
        "ALTER TABLE events ADD COLUMN criteria text",
        _VOTE_FUNCTION.replace("COLUMNS", _COLUMNS_V2),
    ],
    # 4: a model's votes (`preflab judge`, annotators judge:<name>; trainer/judges.py) are
    # nobody's work here either: like imports they fill no pair's overlap K.
    [
        """CREATE OR REPLACE FUNCTION preflab_pair_state(p_pair text, p_who text,
                                              OUT voters text[], OUT leased text[], OUT skipped boolean)
        LANGUAGE sql STABLE AS $$
            SELECT ARRAY(SELECT DISTINCT v.annotator FROM events v
                         WHERE v.pair_id = p_pair AND v.kind = 'vote' AND NOT starts_with(v.annotator, 'import:')
                           AND NOT starts_with(v.annotator, 'judge:')
                           AND NOT EXISTS (SELECT 1 FROM events r
                                           WHERE r.retracts = v.event_id AND r.kind = 'retract')),
                   ARRAY(SELECT l.annotator FROM leases l WHERE l.pair_id = p_pair AND l.expires_at > now()),
                   EXISTS(SELECT 1 FROM skips k WHERE k.pair_id = p_pair AND k.annotator = p_who)
        $$""",
    ],
    # 5: record schema version 3's two conversations of a chat vote, additive and
    # nullable (older rows read them as null); preflab_vote learns to store them.
    [
        "ALTER TABLE events ADD COLUMN IF NOT EXISTS conversation_a text, "
        "ADD COLUMN IF NOT EXISTS conversation_b text",
        _VOTE_FUNCTION.replace("COLUMNS", f"{_COLUMNS_V2}, conversation_a, conversation_b"),
    ],
]

# The SQLSTATE preflab_vote raises when it refuses a vote (VoteConflict).
VOTE_CONFLICT = "PF409"

LATEST = len(MIGRATIONS)


def migrate(conn, target: str) -> int:
    """Bring the database behind `conn` (autocommit mode) to LATEST; returns the
    version it was at before. `target` (password masked) is for error messages."""
    # Up to date already: just look, so a role that may only read and write the
    # tables (no CREATE on the schema) can open a store someone else set up.
    if conn.execute("SELECT to_regclass('preflab_schema_version') IS NOT NULL").fetchone()[0]:
        current = conn.execute("SELECT coalesce(max(version), 0) FROM preflab_schema_version").fetchone()[0]
        if current == LATEST:
            return current
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("""CREATE TABLE IF NOT EXISTS preflab_schema_version (
                            version    integer     PRIMARY KEY,
                            applied_at timestamptz NOT NULL DEFAULT now())""")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM preflab_schema_version").fetchone()[0]
        if current > LATEST:
            raise StoreError(
                f"{target}: the database holds preflab schema version {current}, newer "
                f"than this preflab knows ({LATEST}): upgrade preflab"
            )
        for version in range(current + 1, LATEST + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO preflab_schema_version (version) VALUES (%s)", (version,))
    return current


def has_events_table(conn) -> bool:
    """Whether this database was ever opened as a store (readers do not create tables)."""
    return conn.execute("SELECT to_regclass('events') IS NOT NULL").fetchone()[0]
