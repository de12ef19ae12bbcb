"""The PostgreSQL store: many processes on many machines, one server.

Schema. Created on first open inside one transaction that first takes a
transaction-scoped advisory lock (``pg_advisory_xact_lock``), so any number of
processes may open a new database at the same moment: one creates the tables,
the others wait and then find them. The ``ledger_schema`` table holds the
schema version; a database written by a newer version of this code is refused
with ``StoreError``, never misread. Every table of session data is keyed by
session id and every primary key and unique index includes ``session_id``, so
the schema distributes by session id on Citus unchanged. Times and positions
are ``bigint``; an event is kept as ``encode_stored``'s bytes (``bytea``),
compressed from 600 bytes (``_pack``), beside only the columns a query reads:
its position, depth, ids (as bytes: ``uuid`` and ``bytea``) and idempotency key.
A session's branch heads are arrays in its row of ``ledger_sessions``, the row
every append locks and updates anyway. Older versions of the schema are
upgraded in place on open: version 1 (a second index on the event id), version
2 (append functions that ran slower as the tables grew), version 3 (hex ids,
unread columns, a table of heads, wider indexes of sessions by time) and version
4 (append functions taking each event's data, parent and depth in arrays).
Snapshots (``put_snapshots``) commit without waiting for the WAL flush: they are
a sealed cache that a read rebuilds from the events if a crash loses them.

Appends. One append is one statement, ``SELECT * FROM ledger_append(...)``: a
PL/pgSQL function that does every check and every write of the batch in the
statement's own transaction, so a batch costs one round trip (asyncpg keeps
the statement prepared per connection) and lands whole or not at all. The
batch's stored events travel end to end in one ``bytea`` with their lengths
(asyncpg encodes an array element by element, ~1.7 µs each). It
mirrors ``MemoryStore.append`` check for check:

- an append to an existing session first locks the session's row
  (``SELECT ... FOR UPDATE``): appends to one session run one after the
  other, so the idempotency lookup, the branch-head compare-and-swap, the
  branch limit and the writes all see the latest commit, in any process;
- a ``SessionCreated`` first takes ``pg_advisory_xact_lock`` on its user, so
  two creates with one idempotency key cannot both win and
  ``max_open_sessions`` cannot be overrun; a second create of one session id
  loses on the primary key (``INSERT ... ON CONFLICT DO NOTHING``).

Group commit (``stores.group``). Appends queued together run as one
statement, ``ledger_append_group``, which first takes every user lock and
session row lock they need in one global order (so groups of different
processes cannot deadlock), then calls ``ledger_append`` for each in turn; a
refused request writes nothing, so it needs no subtransaction. One commit, one
WAL flush for the group. If the statement fails because of one request (a batch
repeating an event id) or a deadlock, it is rolled back whole and each request
runs alone. A group of one calls ``ledger_append`` directly. Groups run one at
a time, so the writer keeps one pooled connection of its own between them
(unless the pool holds only one): an append skips the pool's acquire and
release, about 30-50 µs. An append that finds no group queued or running runs
at once on its caller's task (``direct``), skipping the hop through the writer
task.

Nothing is checked in one transaction and written in another. If the
connection drops during an append, the caller gets ``StoreError`` and the
batch either committed whole or not at all: retrying with the same idempotency
key is safe (it replays the original when the first attempt landed).

The global feed. Every event gets a ``bigint`` position, and a reader tailing
the feed (``position > after``) must never skip an event that commits later
with a lower position. Positions come from a sequence that is advanced only
while holding one transaction-scoped advisory lock, the feed lock, taken as
the very last step of an append (after every check and the per-session
writes) and released when the transaction ends, after its commit is visible.
So positions are handed out in commit order: when a reader sees position
``p``, every lower position has committed (or rolled back for good). This is
the table-lock technique of the ``eventsourcing`` library, narrowed to the
events insert and the commit. It costs one commit at a time for the whole
server; PostgreSQL already serialises the commits of transactions that
``NOTIFY``, which every append does, so the lock adds little (see the
measurements in the README). The append notifies ``ledger_feed`` in its
transaction; ``wait_for_feed`` listens on a dedicated connection and falls
back to polling while that connection is down, and ``subscribe`` resumes from
the last position it delivered after a dropped connection or a server
restart, so it delivers every event exactly once.

Errors. Every driver error is translated in ``_translate``, and only there,
into the ledger's errors; a refused connection, an unknown host, a missing
database or a rejected login is one ``StoreError`` naming the host and the
database, never a traceback from the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import os
import re
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
import msgspec

from ledger.errors import (
    BranchExistsError,
    ConfigError,
    EventNotFoundError,
    IntegrityError,
    InvalidEventError,
    LedgerError,
    SessionCapacityError,
    SessionNotFoundError,
    StoreClosedError,
    StoreError,
)
from ledger.events import (
    Event,
    SessionCreated,
    decode_event,
    decode_stored,
    decode_stored_all,
    encode_stored,
    gc_paused,
)
from stores.base import (
    AppendRequest,
    AppendResult,
    FeedItem,
    PurgePage,
    PurgeRecord,
    PurgeRequest,
    PurgeStore,
    SessionPage,
    SessionQuery,
    SessionRow,
    check_ancestry,
    check_erase,
    check_head,
    decode_checked,
    decode_page,
    page_cursor,
    parse_cursor,
    purge_cursor,
    validate_request,
    walk_path,
)
from stores.group import GroupCommit, GroupStats

__all__ = ["DEFAULT_GROUP_SIZE", "SCHEMA_VERSION", "SESSION_TABLES", "PostgresStore"]

SCHEMA_VERSION: Final = 5
"""The version row of ``ledger_schema`` that this code writes. 1: before the events'
primary key led with the event id; 2: before the append functions' current form
(tables unchanged); 3: before ids were stored as bytes and the events' columns
that no query reads were dropped; 4: before the append functions took a batch's
data as one value (tables unchanged). Opened, an older database is upgraded in place."""

DEFAULT_GROUP_SIZE: Final = 64
"""The most appends one group commit holds, unless ``group_size`` says otherwise."""

SESSION_TABLES: Final = (
    "ledger_events",
    "ledger_sessions",
    "ledger_snapshots",
    "ledger_purges",
    "ledger_anchors",
)
"""The tables of session data: each is keyed by (and distributable on) ``session_id``."""

FEED_CHANNEL: Final = "ledger_feed"
"""The ``LISTEN``/``NOTIFY`` channel (``ledger_feed.<schema>`` in a schema of its
own); the payload is the batch's last position."""

# pg_advisory_xact_lock(int, int) keys: a namespace of our own, then the lock.
_LOCK_NS: Final = 0x1ED6E5
_SCHEMA_LOCK: Final = 1
_FEED_LOCK: Final = 2
_USER_LOCK_NS: Final = _LOCK_NS + 1  # second key: hashtext(user_id)

_OPTIONS: Final = ("pool_size", "connect_timeout", "schema", "group_size")
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# The anchors the ledger issued (ledger.anchors), in the order it issued them.
# Also created on opening a database of this schema version made before it existed.
_ANCHORS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS ledger_anchors (
    session_id text NOT NULL,
    n bigint GENERATED ALWAYS AS IDENTITY,
    data bytea NOT NULL,
    PRIMARY KEY (session_id, n)
);
"""

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ledger_schema (
    version integer NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE IF NOT EXISTS ledger_feed_position AS bigint;
-- Only what a query needs beside the event's stored bytes (data): ids as their
-- bytes (a session id's 16, an event id's 32), fixed-width columns first (no
-- alignment padding).
CREATE TABLE IF NOT EXISTS ledger_events (
    position bigint NOT NULL,
    seq bigint NOT NULL,
    session_id uuid NOT NULL,
    id bytea NOT NULL,
    parent bytea,
    idempotency_key text,
    data bytea NOT NULL,
    -- Led by the id: it also serves get(event_id) without a session.
    PRIMARY KEY (id, session_id)
);
-- data is compressed already (encode_stored): kept in the row, not tried again by
-- TOAST's compressor and moved out of line (a second table and index) past ~2 kB.
ALTER TABLE ledger_events ALTER COLUMN data SET STORAGE MAIN;
-- The feed: a plain (non-unique) index, as a unique one without session_id
-- would not distribute.
CREATE INDEX IF NOT EXISTS ledger_events_position ON ledger_events (position);
CREATE INDEX IF NOT EXISTS ledger_events_session_position
    ON ledger_events (session_id, position);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_events_session_key
    ON ledger_events (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The branch heads live in the session's row (heads[i] is the head of
-- branches[i]): the row every append locks and updates anyway.
CREATE TABLE IF NOT EXISTS ledger_sessions (
    session_id text NOT NULL PRIMARY KEY,
    user_id text NOT NULL,
    agent text NOT NULL,
    status text NOT NULL,
    created_at bigint NOT NULL,
    last_activity_at bigint NOT NULL,
    event_count bigint NOT NULL,
    create_key text,
    branches text[] NOT NULL,
    heads text[] NOT NULL
);
-- Every append moves its session's last_activity_at, so these two get a new
-- entry each time (until VACUUM): keyed by the time alone, not the session id
-- too, an entry is a third of the size. Ties, rare, are sorted by the query.
CREATE INDEX IF NOT EXISTS ledger_sessions_activity ON ledger_sessions (last_activity_at);
CREATE INDEX IF NOT EXISTS ledger_sessions_user ON ledger_sessions (user_id, last_activity_at);
CREATE INDEX IF NOT EXISTS ledger_sessions_user_status ON ledger_sessions (user_id, status);
-- Not unique: a create key is unique per user under the user's advisory lock,
-- and a unique index without session_id would not distribute.
CREATE INDEX IF NOT EXISTS ledger_sessions_create_key
    ON ledger_sessions (user_id, create_key) WHERE create_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS ledger_snapshots (
    session_id text NOT NULL,
    key text NOT NULL,
    event_id text NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (session_id, key, event_id)
);
{anchors_table}
CREATE OR REPLACE FUNCTION ledger_append(
    p_session text, p_branch text, p_expected text, p_status text,
    p_user text, p_agent text, p_max_open bigint, p_max_branches bigint,
    p_first_at bigint, p_last_at bigint,
    p_ids bytea[], p_parent bytea, p_first_seq bigint, p_keys text[],
    p_data bytea, p_lengths text
) RETURNS TABLE (o_outcome text, o_detail text, o_position bigint, o_id text, o_data bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer := cardinality(p_ids);
    v_lengths integer[];
    v_bad boolean;
    v_key text := p_keys[1];
    v_last_id text := encode(p_ids[cardinality(p_ids)], 'hex');
    v_last_at bigint := p_last_at;
    v_current text;
    v_count bigint;
    v_first bigint;
    v_found record;
    v_branches text[];
    v_heads text[];
    v_branch integer;
BEGIN
    -- The events' data end to end in one value, and each one's length.
    IF v_n > 1 THEN
        v_lengths := string_to_array(p_lengths, ',')::integer[];
        v_bad := cardinality(v_lengths) IS DISTINCT FROM v_n
            OR (SELECT sum(l) FROM unnest(v_lengths) AS l) IS DISTINCT FROM length(p_data);
    ELSE
        v_bad := p_lengths IS DISTINCT FROM length(p_data)::text;
    END IF;
    IF v_bad THEN
        RAISE EXCEPTION 'ledger_append: % events, but data lengths % for % bytes',
            v_n, p_lengths, length(p_data);
    END IF;
    IF p_user IS NOT NULL THEN
        -- A SessionCreated: the creates of one user run one at a time.
        PERFORM pg_advisory_xact_lock({user_lock_ns}, hashtext(p_user));
        IF v_key IS NOT NULL THEN
            SELECT e.position, e.id, e.session_id, e.data INTO v_found
            FROM ledger_sessions AS s JOIN ledger_events AS e
                ON e.session_id = s.session_id::uuid AND e.idempotency_key = s.create_key
            WHERE s.user_id = p_user AND s.create_key = v_key
            ORDER BY e.position LIMIT 1;
            IF FOUND THEN
                RETURN QUERY SELECT 'replay', v_found.session_id::text, v_found.position,
                    encode(v_found.id, 'hex'), v_found.data;
                RETURN;
            END IF;
        END IF;
        IF p_max_open IS NOT NULL THEN
            SELECT count(*) INTO v_count FROM ledger_sessions AS s
            WHERE s.user_id = p_user AND s.status IN ('active', 'suspended');
            IF v_count >= p_max_open THEN
                RETURN QUERY SELECT 'open_sessions', NULL::text, NULL::bigint, NULL::text,
                    NULL::bytea;
                RETURN;
            END IF;
        END IF;
        SELECT s.heads[array_position(s.branches, p_branch)] INTO v_current
        FROM ledger_sessions AS s WHERE s.session_id = p_session;
        IF v_current IS DISTINCT FROM p_expected THEN
            RETURN QUERY SELECT 'head', v_current, NULL::bigint, NULL::text, NULL::bytea;
            RETURN;
        END IF;
        INSERT INTO ledger_sessions AS s (session_id, user_id, agent, status, created_at,
            last_activity_at, event_count, create_key, branches, heads)
        VALUES (p_session, p_user, p_agent, coalesce(p_status, 'active'), p_first_at,
            v_last_at, v_n, v_key, ARRAY[p_branch], ARRAY[v_last_id])
        ON CONFLICT (session_id) DO NOTHING;
        IF NOT FOUND THEN
            -- The session id exists (a concurrent create may just have made it).
            RETURN QUERY SELECT 'exists', v_current, NULL::bigint, NULL::text, NULL::bytea;
            RETURN;
        END IF;
    ELSE
        -- The session's row lock: every append to this session waits here.
        SELECT s.branches, s.heads INTO v_branches, v_heads
        FROM ledger_sessions AS s WHERE s.session_id = p_session FOR UPDATE;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'not_found', NULL::text, NULL::bigint, NULL::text,
                NULL::bytea;
            RETURN;
        END IF;
        IF v_key IS NOT NULL THEN
            SELECT e.position, e.id, e.session_id, e.data INTO v_found FROM ledger_events AS e
            WHERE e.session_id = p_session::uuid AND e.idempotency_key = v_key;
            IF FOUND THEN
                RETURN QUERY SELECT 'replay', v_found.session_id::text, v_found.position,
                    encode(v_found.id, 'hex'), v_found.data;
                RETURN;
            END IF;
        END IF;
        -- The compare-and-swap, on the row read under the session's lock.
        v_branch := array_position(v_branches, p_branch);
        v_current := v_heads[v_branch];
        IF v_current IS DISTINCT FROM p_expected THEN
            RETURN QUERY SELECT 'head', v_current, NULL::bigint, NULL::text, NULL::bytea;
            RETURN;
        END IF;
        IF v_branch IS NOT NULL THEN
            v_heads[v_branch] := v_last_id;
        ELSIF p_max_branches IS NOT NULL AND cardinality(v_branches) >= p_max_branches THEN
            RETURN QUERY SELECT 'branches', NULL::text, NULL::bigint, NULL::text, NULL::bytea;
            RETURN;
        ELSE
            v_branches := v_branches || p_branch;
            v_heads := v_heads || v_last_id;
        END IF;
        UPDATE ledger_sessions AS s SET
            branches = v_branches,
            heads = v_heads,
            status = coalesce(p_status, s.status),
            last_activity_at = greatest(s.last_activity_at, v_last_at),
            event_count = s.event_count + v_n
        WHERE s.session_id = p_session;
    END IF;
    -- The feed lock, held until the transaction ends: positions are handed
    -- out in commit order. Taken last, so it covers only the insert and commit.
    PERFORM pg_advisory_xact_lock({lock_ns}, {feed_lock});
    v_first := nextval('ledger_feed_position');
    IF v_n > 1 THEN
        PERFORM setval('ledger_feed_position', v_first + v_n - 1);
    END IF;
    IF v_n = 1 THEN  -- most appends: one event, the whole value its data
        INSERT INTO ledger_events (position, seq, session_id, id, parent, idempotency_key, data)
        VALUES (v_first, p_first_seq, p_session::uuid, p_ids[1], p_parent, v_key, p_data);
    ELSE
        -- The events are one chain: each one's parent is the one before it, its
        -- depth one more; its data ends where the lengths so far add up to.
        INSERT INTO ledger_events (position, seq, session_id, id, parent, idempotency_key, data)
        SELECT v_first + t.ord - 1, p_first_seq + t.ord - 1, p_session::uuid, t.id,
            CASE WHEN t.ord = 1 THEN p_parent ELSE p_ids[t.ord - 1] END, p_keys[t.ord],
            substring(p_data FROM (t.stop - t.len + 1)::integer FOR t.len)
        FROM (
            SELECT u.id, u.len, u.ord, sum(u.len) OVER (ORDER BY u.ord) AS stop
            FROM unnest(p_ids, v_lengths) WITH ORDINALITY AS u(id, len, ord)
        ) AS t;
    END IF;
    PERFORM pg_notify('{channel}', (v_first + v_n - 1)::text);
    RETURN QUERY SELECT 'ok', NULL::text, v_first + v_n - 1, NULL::text, NULL::bytea;
END
$$;

-- A group commit: many appends, each run by ledger_append, in one transaction.
-- p_ids and p_keys hold every request's events end to end; p_counts says how
-- many are whose; the other arrays hold one value per request. Returns one row
-- per request: its index (from 1) and its answer.
CREATE OR REPLACE FUNCTION ledger_append_group(
    p_sessions text[], p_branches text[], p_expected text[], p_statuses text[],
    p_users text[], p_agents text[], p_max_open bigint[], p_max_branches bigint[],
    p_first_ats bigint[], p_last_ats bigint[], p_counts integer[],
    p_ids bytea[], p_parents bytea[], p_first_seqs bigint[], p_keys text[],
    p_data bytea[], p_lengths text[]
) RETURNS TABLE (o_request integer, o_outcome text, o_detail text, o_position bigint,
    o_id text, o_data bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_lo integer := 1;
    v_hi integer;
    v_hash integer;
BEGIN
    -- Every lock the group's checks need, taken up front in one global order
    -- (users' create locks by key, then sessions' rows by id), so that groups
    -- of different processes never wait on each other in a cycle; the feed
    -- lock, taken by the first write, comes after all of them.
    FOR v_hash IN
        SELECT DISTINCT hashtext(u) FROM unnest(p_users) AS u WHERE u IS NOT NULL ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock({user_lock_ns}, v_hash);
    END LOOP;
    -- One key lookup per session, in id order: a plan cached while the table
    -- was small stays an index lookup as it grows (an "= ANY" scan of it became
    -- a sequential scan: groups slowed as sessions were added).
    PERFORM 1 FROM (SELECT DISTINCT unnest(p_sessions) ORDER BY 1) AS u(session_id)
    CROSS JOIN LATERAL (
        SELECT 1 FROM ledger_sessions AS s WHERE s.session_id = u.session_id FOR UPDATE
    ) AS locked;
    FOR i IN 1 .. cardinality(p_sessions) LOOP
        v_hi := v_lo + p_counts[i] - 1;
        SELECT i, a.o_outcome, a.o_detail, a.o_position, a.o_id, a.o_data
        INTO o_request, o_outcome, o_detail, o_position, o_id, o_data
        FROM ledger_append(p_sessions[i], p_branches[i], p_expected[i], p_statuses[i],
            p_users[i], p_agents[i], p_max_open[i], p_max_branches[i],
            p_first_ats[i], p_last_ats[i],
            p_ids[v_lo:v_hi], p_parents[i], p_first_seqs[i], p_keys[v_lo:v_hi],
            p_data[i], p_lengths[i]) AS a;
        RETURN NEXT;
        v_lo := v_hi + 1;
    END LOOP;
END
$$;
"""

_UPGRADE_1_TO_2: Final = """
ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_pkey,
    ADD CONSTRAINT ledger_events_pkey PRIMARY KEY (id, session_id);
DROP INDEX IF EXISTS ledger_events_id;
"""
"""Version 1 kept the events' primary key as (session_id, id) and a second index on
id alone for ``get``; one key led by the id serves both, for one index fewer per
event. Rebuilding the key locks the events table while it runs (once)."""

_DROP_APPEND_FUNCTIONS: Final = """
DO $$
DECLARE
    v_function regprocedure;
BEGIN
    -- The append functions change their arguments' types: a new definition
    -- would be an overload beside the old, not a replacement.
    FOR v_function IN
        SELECT p.oid::regprocedure FROM pg_proc AS p
        WHERE p.proname IN ('ledger_append', 'ledger_append_group')
            AND p.pronamespace = current_schema()::regnamespace
    LOOP
        EXECUTE 'DROP FUNCTION ' || v_function;
    END LOOP;
END
$$;
"""

_UPGRADE_4_TO_5: Final = _DROP_APPEND_FUNCTIONS
"""Version 4's append functions took each event's data, parent and depth in arrays:
asyncpg encodes an array element by element (~1.7 µs each here), a third of the
client's cost of sending a batch. The schema script then makes the new ones."""

_UPGRADE_3_TO_4: Final = (
    """
DO $$
DECLARE
    v_bad record;
BEGIN
    -- Refused whole, naming it, rather than converted into what would read back
    -- differently (an upper-case id would come back in lower case).
    SELECT e.session_id, e.id INTO v_bad FROM ledger_events AS e
    WHERE e.session_id !~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        OR e.id !~ '^([0-9a-f]{2})+$' OR e.parent !~ '^([0-9a-f]{2})+$'
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'event % of session %: ids must be lower-case hex and session ids '
            'lower-case uuids', quote_literal(v_bad.id), quote_literal(v_bad.session_id);
    END IF;
END
$$;
"""
    + _DROP_APPEND_FUNCTIONS
    + """
ALTER TABLE ledger_events
    ALTER COLUMN session_id TYPE uuid USING session_id::uuid,
    ALTER COLUMN id TYPE bytea USING decode(id, 'hex'),
    ALTER COLUMN parent TYPE bytea USING decode(parent, 'hex'),
    DROP COLUMN branch,
    DROP COLUMN kind,
    DROP COLUMN at;
DROP INDEX ledger_sessions_activity, ledger_sessions_user;
ALTER TABLE ledger_sessions
    ADD COLUMN branches text[] NOT NULL DEFAULT '{}',
    ADD COLUMN heads text[] NOT NULL DEFAULT '{}';
UPDATE ledger_sessions AS s SET branches = h.branches, heads = h.heads
FROM (
    SELECT session_id, array_agg(branch ORDER BY branch) AS branches,
        array_agg(head ORDER BY branch) AS heads
    FROM ledger_heads GROUP BY session_id
) AS h
WHERE h.session_id = s.session_id;
ALTER TABLE ledger_sessions
    ALTER COLUMN branches DROP DEFAULT,
    ALTER COLUMN heads DROP DEFAULT;
DROP TABLE ledger_heads;
"""
)
"""Version 3 kept ids as hex text and each event's branch, kind and time in columns
no query reads (its data holds them). Rewriting the table locks it while it runs
(once); its rows' data stay as they are (``_unpack`` reads them). The two indexes
of sessions by time are made again, narrower, by the schema script. The heads
move from their own table (a row per branch) into their session's row."""

_PURGE_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ledger_purges (
    session_id text NOT NULL PRIMARY KEY,
    user_id text NOT NULL,
    purged_at bigint NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_purges_time ON ledger_purges (purged_at, session_id);
CREATE INDEX IF NOT EXISTS ledger_purges_user ON ledger_purges (user_id, purged_at, session_id);
"""
"""Created at every open, after the schema lock (databases made before retention get it)."""

_APPEND_SQL: Final = (
    "SELECT o_outcome, o_detail, o_position, o_id, o_data "
    "FROM ledger_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
)
_APPEND_GROUP_SQL: Final = (
    "SELECT o_request, o_outcome, o_detail, o_position, o_id, o_data FROM ledger_append_group("
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
)
_REQUEST_FIELDS: Final = 10
"""The leading arguments of ``ledger_append`` that are one per request; the rest are per event."""
_IDS_FIELD, _PARENT_FIELD, _FIRST_SEQ_FIELD, _KEYS_FIELD, _DATA_FIELD, _LENGTHS_FIELD = range(
    _REQUEST_FIELDS, _REQUEST_FIELDS + 6
)
"""The arguments after those: the ids and idempotency keys are one per event (``p_keys``
NULL when no event has one: ``_keys_arg``); the first event's parent and depth, and
the events' data end to end with each one's length, are one per request."""
_EVENT_COLUMNS: Final = "position, encode(id, 'hex'), session_id::text, data"
_PAGE_SQL: Final = (
    "SELECT position, encode(id, 'hex'), NULL::text, data FROM ledger_events "
    "WHERE session_id = $1 AND position > $2 AND position <= $3 ORDER BY position LIMIT $4"
)
"""A page of the session ``$1``'s events after position ``$2`` up to ``$3``, at most
``$4``: rows as ``_EVENT_COLUMNS``, but the session, known, not sent with each."""
# A snapshot is a cache of a fold, sealed and checked when read: its transaction
# commits without waiting for the WAL flush (synchronous_commit off for that
# transaction alone; the connection's appends still wait). A crash may lose the
# last ones written: a read then folds from the events, which are durable, and
# writes them again. The flush was most of a snapshot's cost, paid by the append
# (one in 2.56 batches of 100) that reached a due depth.
_PUT_SNAPSHOTS_SQL: Final = (
    "WITH async_commit AS (SELECT set_config('synchronous_commit', 'off', true)) "
    "INSERT INTO ledger_snapshots (session_id, key, event_id, state) "
    "SELECT $1, $2, t.event_id, t.state "
    "FROM async_commit, unnest($3::text[], $4::bytea[]) AS t(event_id, state) "
    "ON CONFLICT (session_id, key, event_id) DO UPDATE SET state = excluded.state"
)
_PATH_WINDOW: Final = 4096
"""Rows read at once by a walk of a path: a path of a million events takes 245 reads."""


def _window_sql(column: str) -> str:
    """A window of the session ``$1``'s events ``(position, id, NULL, column, parent)``
    from the cursor ``$2``'s position down, newest first, below position ``$3``, at
    most ``$4``. (The session is known: it is not sent again with every row.)"""
    # The cursor's position is a scalar subquery, so the server bounds the index
    # scan with it (as a join, with no statistics after a bulk load, it scanned
    # the whole session).
    return (
        f"SELECT position, encode(id, 'hex'), NULL::text, {column}, "
        "encode(parent, 'hex') FROM ledger_events "
        "WHERE session_id = $1 AND position < $3 AND position <= "
        "(SELECT position FROM ledger_events WHERE session_id = $1 AND id = $2) "
        "ORDER BY position DESC LIMIT $4"
    )


def _first_window_sql(column: str) -> str:
    """The first window of a walk, from the event ``$1`` (its id's bytes) down, at most
    ``$2`` rows ``(position, id, session_id, column, parent)``: the session is found
    by the id in the same statement, and named in the first row (the others: NULL)."""
    # The lookup by id is planned on its own (MATERIALIZED), so it stays a seek in
    # the primary key: with no statistics yet (a bulk load) an ORDER BY ... LIMIT
    # over the table could walk the feed's position index to the event instead.
    # An id stored in two sessions belongs to the first written.
    return (
        "WITH found AS MATERIALIZED ("
        " SELECT position, session_id FROM ledger_events WHERE id = $1"
        "), cursor_row AS (SELECT position, session_id FROM found ORDER BY position LIMIT 1)"
        " SELECT e.position, encode(e.id, 'hex'),"
        " CASE WHEN e.position = c.position THEN c.session_id::text END,"
        f" e.{column}, "
        "encode(e.parent, 'hex') FROM cursor_row AS c CROSS JOIN LATERAL ("
        f" SELECT position, id, {column}, parent FROM ledger_events"
        " WHERE session_id = c.session_id AND position <= c.position"
        " ORDER BY position DESC LIMIT $2"
        ") AS e"
    )


def _chain_sql(column: str) -> str:
    """Up to ``$4`` rows ``(position, id, NULL, column, parent)`` of the path from
    ``$2`` (below position ``$3``) by index seeks, in the session ``$1``: for where
    windows are mostly other branches."""
    return (
        f"WITH RECURSIVE chain(position, id, {column}, parent, depth) AS ("
        f" SELECT position, id, {column}, parent, 1::bigint FROM ledger_events"
        " WHERE session_id = $1 AND id = $2 AND position < $3"
        " UNION ALL"
        f" SELECT e.position, e.id, e.{column}, e.parent, c.depth + 1"
        " FROM chain AS c JOIN ledger_events AS e"
        " ON e.session_id = $1 AND e.id = c.parent AND e.position < c.position"
        " WHERE c.depth < $4"
        f") SELECT position, encode(id, 'hex'), NULL::text, {column}, "
        "encode(parent, 'hex') FROM chain ORDER BY depth"
    )


# ancestors reads the events' data; path_index only their seq.
_FIRST_WINDOW_SQL: Final = _first_window_sql("data")
_WINDOW_SQL: Final = _window_sql("data")
_CHAIN_SQL: Final = _chain_sql("data")
_INDEX_FIRST_WINDOW_SQL: Final = _first_window_sql("seq")
_INDEX_WINDOW_SQL: Final = _window_sql("seq")
_INDEX_CHAIN_SQL: Final = _chain_sql("seq")
_PathSQL = tuple[str, str, str]
"""The statements of a walk back along a path: its first window, the next ones, a chain."""
_PATH_SQL: Final = (_FIRST_WINDOW_SQL, _WINDOW_SQL, _CHAIN_SQL)
_INDEX_PATH_SQL: Final = (_INDEX_FIRST_WINDOW_SQL, _INDEX_WINDOW_SQL, _INDEX_CHAIN_SQL)
_SESSION_COLUMNS: Final = (
    "session_id, user_id, agent, status, created_at, last_activity_at, event_count"
)

_Row = Any  # an asyncpg.Record: indexable by position
_Args = tuple[Any, ...]  # the arguments of ledger_append, in its order

# The connection is gone, or the server is going away or not yet up. (asyncpg
# may report a connection the server terminated as InternalClientError: see
# https://github.com/MagicStack/asyncpg/issues/1069.)
_CONNECTION_LOST: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    ConnectionError,
)

# A group's statement failed because of what one request holds (a batch that
# repeats an event id) or a deadlock with another process's group: the group is
# rolled back whole, then each request is run alone.
_ONE_REQUESTS_FAULT: Final = (
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.TransactionRollbackError,
)


# --- driver errors: translated here and nowhere else -------------------------------


class _Target(msgspec.Struct, frozen=True):
    """Where the store points, for messages: never the password."""

    host: str
    database: str
    schema: str | None = None

    def __str__(self) -> str:
        schema = f", schema {self.schema!r}" if self.schema else ""
        return f"host {self.host!r}, database {self.database!r}{schema}"


@contextlib.contextmanager
def _translate(
    target: _Target,
    *,
    session_id: str | None = None,
    doing: str = "",
) -> Iterator[None]:
    """Turn every asyncpg (and socket) error raised inside the block into the ledger's.

    ``doing`` names the operation ("append", "open", ...) for the message.
    """
    where = f" (session {session_id!r})" if session_id else ""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        # Reached only by a batch whose later events repeat an event id or an
        # idempotency key: the first event's key is checked before writing.
        raise InvalidEventError(f"Write refused by PostgreSQL at {target}{where}: {exc}") from None
    except asyncpg.InvalidCatalogNameError:
        raise StoreError(
            f"PostgreSQL database does not exist: {target.database!r} (host {target.host!r})"
        ) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise StoreError(f"PostgreSQL refused the login at {target}: {exc}") from None
    except asyncpg.exceptions.TooManyConnectionsError as exc:
        raise StoreError(f"PostgreSQL has no free connection at {target}: {exc}") from None
    except asyncpg.ClientConfigurationError as exc:
        raise ConfigError(f"Invalid PostgreSQL connection settings for {target}: {exc}") from None
    except _CONNECTION_LOST as exc:
        if doing == "append":
            raise StoreError(
                f"Connection to PostgreSQL at {target} lost during an append{where}: the "
                "batch was written whole or not at all; retrying it with the same "
                f"idempotency key is safe ({type(exc).__name__}: {exc})"
            ) from None
        raise StoreError(
            f"Connection to PostgreSQL at {target} lost{where}: {type(exc).__name__}: {exc}"
        ) from None
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", "?")
        raise StoreError(f"PostgreSQL error at {target}{where}: {exc} (SQLSTATE {state})") from None
    except OSError as exc:  # refused, unreachable, unknown host (socket.gaierror)
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StoreError(f"Cannot connect to PostgreSQL at {target}: {reason}") from None
    except TimeoutError:
        action = f"{doing} " if doing else ""
        raise StoreError(f"PostgreSQL {action}timed out at {target}{where}") from None


# --- encoding and decoding ------------------------------------------------------------

_PACK_FROM: Final = 600
"""Events this long or longer (as JSON) are stored compressed (``encode_stored``: its
preset dictionary holds what every event repeats). PostgreSQL compresses a value
only in rows over about 2 kB, so without this most turns would be stored as they
are. A shorter event is mostly its envelope (~420 bytes of ids, digests and keys,
hex digits that compress only to about half) and stays plain: unpacking it would
cost a reader more than decoding it, to save some 250 bytes."""

_ZLIB_STREAM: Final = b"x"
"""The first byte of what version 3 stored for a large event: a zlib stream (``0x78``)."""


def _pack(event: Event) -> bytes:
    """What ``data`` holds: ``encode_stored`` of the event, compressed from ``_PACK_FROM``."""
    return encode_stored(event, compress_from=_PACK_FROM)


def _unpack(data: bytes) -> Event:
    """The event ``data`` holds (``_pack``'s, or a version 3 row's zlib stream).

    Raises ``msgspec.DecodeError`` or ``zlib.error`` for a damaged value.
    """
    if data[:1] == _ZLIB_STREAM:
        return decode_event(zlib.decompress(data))
    return decode_stored(data)


def _id_key(event_id: str) -> bytes | None:
    """An event id as the tables keep it, its bytes; None for what no stored id can be."""
    try:
        key = bytes.fromhex(event_id)
    except ValueError:
        return None
    return key if key.hex() == event_id else None  # one spelling: lower-case, no spaces


def _decode(row: _Row, target: _Target) -> Event:
    """A stored event, or IntegrityError: a bad row is never skipped nor returned."""
    position, event_id, session_id, data = row[0], row[1], row[2], row[3]
    try:
        event = _unpack(data)
    except (msgspec.MsgspecError, TypeError, zlib.error) as exc:
        raise IntegrityError(
            f"Stored event does not decode: {event_id!r} (position {position} at {target}): {exc}",
            event_id,
        ) from None
    if event.id != event_id or event.session != session_id:
        raise IntegrityError(
            f"Stored event does not match its row: {event_id!r} (position {position} at "
            f"{target}) decodes as {event.id!r} of session {event.session!r}",
            event_id,
        )
    return event


_get_position = operator.itemgetter(0)
_get_index_entry = operator.itemgetter(1, 3, 4)  # (id, seq, parent) of a path_index row


def _decode_rows(rows: Sequence[_Row], target: _Target) -> list[Event]:
    """``_decode`` of many rows (``stores.base.decode_page``): a page holding a
    version 3 row goes row by row."""
    with gc_paused():  # a page of rows is a bulk read: see ledger.events.gc_paused
        return decode_page(rows, decode_stored_all, lambda row: _decode(row, target))


_get_id, _get_data = operator.itemgetter(1), operator.itemgetter(3)


def _decode_session_rows(rows: Sequence[_Row], session_id: str, target: _Target) -> list[Event]:
    """``_decode_rows`` of rows ``(position, id, _, data, ...)`` all of the session
    ``session_id``, which the rows need not repeat (a third of a row's bytes)."""
    with gc_paused():
        events = decode_checked(
            list(map(_get_data, rows)), list(map(_get_id, rows)), session_id, decode_stored_all
        )
        if events is None:  # one is bad (or a version 3 row): row by row, naming it
            events = [_decode((row[0], row[1], session_id, row[3]), target) for row in rows]
        return events


_SESSION_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _is_session_id(session_id: str) -> bool:
    """Whether ``session_id`` can be stored in the events' ``uuid`` column and read back
    the same: a lower-case uuid (as ``ledger.events.new_session_id`` makes)."""
    return isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id) is not None


def _keys(request: AppendRequest) -> tuple[list[bytes], bytes | None]:
    """The request's event ids as stored, and its first event's parent's.

    Raises:
        InvalidEventError: a session id that is not a lower-case uuid, or an event
            id that is not lower-case hex (no real one is either).
    """
    if not _is_session_id(request.session_id):
        raise InvalidEventError(
            f"Invalid session id for the PostgreSQL store: {request.session_id!r} "
            "(a lower-case uuid string)"
        )
    events = request.events
    ids = [_id_key(e.id) for e in events]
    parent = events[0].parent
    parent_key = None if parent is None else _id_key(parent)
    if None in ids or (parent is not None and parent_key is None):
        bad = events[ids.index(None)].id if None in ids else parent
        raise InvalidEventError(
            f"Invalid event id for the PostgreSQL store: {bad!r} "
            f"(session {request.session_id!r}; lower-case hex)"
        )
    return cast(list[bytes], ids), parent_key


def _append_args(request: AppendRequest) -> _Args:
    """The arguments of ``ledger_append`` for one request (``_REQUEST_FIELDS``, then
    ``_IDS_FIELD`` to ``_LENGTHS_FIELD``).

    The events are one chain (``validate_request``): each one's parent is the
    one before it and its depth one more, so only the first's are sent. Their
    stored forms go end to end in one ``bytea`` with their lengths as text: an
    array of them costs asyncpg ~1.7 µs an element to encode.
    """
    events = request.events
    first = events[0]
    created = first.body if isinstance(first.body, SessionCreated) else None
    ids, parent = _keys(request)
    packed = [_pack(e) for e in events]
    return (
        request.session_id,
        request.branch,
        request.expected_head,
        request.status,
        created.user_id if created else None,
        created.agent if created else None,
        request.max_open_sessions if created else None,
        request.max_branches if not created and request.expected_head is None else None,
        first.at,
        events[-1].at,
        ids,
        parent,
        first.seq,
        _keys_arg([e.idempotency_key for e in events]),
        b"".join(packed),
        ",".join(map(str, map(len, packed))),
    )


def _keys_arg(keys: list[str | None]) -> list[str | None] | None:
    """``p_keys``: the events' idempotency keys, or NULL when none has one (most
    batches), which the functions read as a NULL key for each event. asyncpg
    inspects every element of a list it sends (~0.2 µs each)."""
    return None if keys.count(None) == len(keys) else keys


async def _purge_one(conn: Any, record: PurgeRecord) -> bool:
    """Delete one session whole and write its record, in the caller's transaction."""
    session_id = record.session_id
    # The session's row lock: appends to it wait, then find it gone.
    row = await conn.fetchrow(
        "SELECT event_count, last_activity_at FROM ledger_sessions "
        "WHERE session_id = $1 FOR UPDATE",
        session_id,
    )
    if row is None or (row[0], row[1]) != (record.event_count, record.last_activity_at):
        return False  # gone, or written to since the purge was planned: kept
    for table in (
        "ledger_events",
        "ledger_snapshots",
        "ledger_anchors",
        "ledger_sessions",
    ):
        await conn.execute(f"DELETE FROM {table} WHERE session_id = $1", session_id)
    await conn.execute(
        "INSERT INTO ledger_purges (session_id, user_id, purged_at, record) "
        "VALUES ($1, $2, $3, $4)",
        session_id,
        record.user_id,
        record.purged_at,
        msgspec.json.encode(record),
    )
    return True


def _purge_record(row: _Row, target: _Target) -> PurgeRecord:
    try:
        return msgspec.json.decode(bytes(row[1]), type=PurgeRecord)
    except msgspec.MsgspecError as exc:
        raise IntegrityError(
            f"Stored purge record does not decode: session {row[0]!r} at {target}: {exc}"
        ) from None


def _session_row(row: _Row) -> SessionRow:
    return SessionRow(
        session_id=row[0],
        user_id=row[1],
        agent=row[2],
        status=row[3],
        created_at=row[4],
        last_activity_at=row[5],
        event_count=row[6],
    )


# --- URLs ---------------------------------------------------------------------------


def _parse_url(url: str) -> tuple[str, _Target, dict[str, str]]:
    """The DSN for asyncpg (without our options), where it points, and our options."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"Invalid PostgreSQL URL ({exc}): {_redact(url)!r}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"Invalid PostgreSQL URL: {_redact(url)!r} (expected postgresql://user@host/db)"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _OPTIONS}
    rest = [(k, v) for k, v in query if k not in _OPTIONS]
    dsn = urlunsplit(parts._replace(query=urlencode(rest)))
    host = parts.hostname or os.environ.get("PGHOST") or "localhost"
    port_text = str(port or os.environ.get("PGPORT") or 5432)
    user = unquote(parts.username or "") or os.environ.get("PGUSER") or ""
    database = (
        unquote(parts.path.lstrip("/")) or os.environ.get("PGDATABASE") or user or "(default)"
    )
    schema = ours.get("schema")
    if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigError(
            f"Invalid PostgreSQL schema in {_redact(url)!r}: {schema!r} "
            "(lower-case letters, digits and '_', at most 63)"
        )
    return dsn, _Target(f"{host}:{port_text}", database, schema), ours


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url.split("@")[-1]


def _usable(conn: Any) -> bool:
    """Whether a pooled connection kept out of the pool is still open and still ours.

    One the server closed is handed back to the pool (its slot freed) by asyncpg
    itself, or here.
    """
    try:
        if not conn.is_closed():
            return True
        conn.terminate()
    except asyncpg.InterfaceError:
        pass  # asyncpg already gave it back to the pool
    return False


_Run = Callable[..., Awaitable[Any]]
"""A function of a connection, a statement and its arguments that runs it (``_call``)."""


async def _fetch_in_index_order(conn: Any, sql: str, *args: Any) -> list[_Row]:
    """``conn.fetch``, planned with sorting ruled out: a page of a session's events in
    order is read from its index, whatever the planner estimates.

    Without statistics (a table just bulk-loaded, before any ``ANALYZE``) the planner
    guesses that a session holds about a hundred rows, so the first executions of a
    page's statement, planned for its values, would fetch the session's whole range
    and sort it: 0.5 to 1.2 s a page at a million events, where the index reads one
    page in milliseconds. It costs three more round trips (0.25 ms), nothing beside a
    page of thousands of rows.
    """
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL enable_sort = off")
        return await conn.fetch(sql, *args)  # type: ignore[no-any-return]


async def _no_reset(connection: Any) -> None:
    """Skip asyncpg's reset query on release: our pool connections keep no session state.

    (asyncpg still rolls back a transaction left open.) It saves a round trip
    per call.
    """


class PostgresStore(PurgeStore):
    """The PostgreSQL store: one server, many processes and machines.

    Args:
        dsn: An asyncpg connection string (``postgresql://user@host:port/db``).
        pool_size: The most connections this store opens (default 10); one
            more is opened for ``LISTEN`` when the feed is followed.
        connect_timeout: Seconds to wait for a connection (default 10).
        schema: A PostgreSQL schema of its own for the ledger's tables (created
            when missing); default: the server's ``search_path`` (``public``).
        group_size: The most concurrent appends committed together in one
            transaction (default 64; 1: one transaction per append). See
            ``stores.group``.
        url: The URL to show for this store (default: ``dsn``).

    Example::

        async with PostgresStore.from_url("postgresql://app@db.internal/ledger") as store:
            await store.append(request)
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        connect_timeout: float = 10.0,
        schema: str | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        url: str | None = None,
    ) -> None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"Invalid PostgreSQL pool_size: {pool_size!r} (an integer >= 1)")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ConfigError(f"Invalid PostgreSQL group_size: {group_size!r} (an integer >= 1)")
        try:
            timeout = float(connect_timeout)
        except (TypeError, ValueError):
            timeout = -1.0
        if not timeout > 0:
            raise ConfigError(
                f"Invalid PostgreSQL connect_timeout: {connect_timeout!r} (seconds, > 0)"
            )
        self._dsn, target, _ = _parse_url(dsn)
        if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigError(
                f"Invalid PostgreSQL schema: {schema!r} "
                "(lower-case letters, digits and '_', at most 63)"
            )
        self.target = _Target(target.host, target.database, schema)
        self.schema = schema
        self.channel = f"{FEED_CHANNEL}.{schema}" if schema else FEED_CHANNEL
        # Every connection resolves the ledger's names in its schema alone.
        self._settings = {"search_path": schema} if schema else {}
        self.url = url or dsn
        self.pool_size = pool_size
        self.connect_timeout = timeout
        self.reconnect_timeout = 60.0
        """Seconds ``subscribe`` keeps retrying while the server cannot be reached."""
        self._pool: Any = None
        self._writer_conn: Any = None  # the group writer's own: see _write_call
        self._listener: Any = None
        self._listener_lock = asyncio.Lock()
        self._listener_retry_at = 0.0
        self._notified = asyncio.Event()
        self._group: GroupCommit[tuple[AppendRequest, _Args], AppendResult] = GroupCommit(
            self._run_group,
            max_size=group_size,
            name=f"PostgreSQL at {self.target}",
            direct=True,  # an append alone skips the hop through the writer task
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        pool_size: int | None = None,
        connect_timeout: float | None = None,
        schema: str | None = None,
        group_size: int | None = None,
    ) -> PostgresStore:
        """``postgresql://user:password@host:port/database`` (or ``postgres://``).

        ``?pool_size=20&connect_timeout=5&schema=ledger&group_size=1`` set the
        options (keywords win); any other query parameter (``sslmode``, ...)
        goes to asyncpg.

        Raises:
            ConfigError: the URL or an option is malformed.
        """
        options = _parse_url(url)[2]
        if pool_size is None:
            try:
                pool_size = int(options.get("pool_size", 10))
            except ValueError:
                raise ConfigError(
                    f"Invalid PostgreSQL pool_size in {_redact(url)!r} (an integer >= 1)"
                ) from None
        if connect_timeout is None:
            try:
                connect_timeout = float(options.get("connect_timeout", 10.0))
            except ValueError:
                raise ConfigError(
                    f"Invalid PostgreSQL connect_timeout in {_redact(url)!r} (seconds)"
                ) from None
        if schema is None:
            schema = options.get("schema")
        if group_size is None:
            try:
                group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
            except ValueError:
                raise ConfigError(
                    f"Invalid PostgreSQL group_size in {_redact(url)!r} (an integer >= 1)"
                ) from None
        return cls(
            url,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            schema=schema,
            group_size=group_size,
            url=url,
        )

    # lifecycle

    async def _open(self) -> None:
        pool: Any = None
        try:
            with _translate(self.target, doing="open"):
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=self.connect_timeout,
                    reset=_no_reset,
                    server_settings=self._settings,
                )
                async with pool.acquire() as conn, conn.transaction():
                    await self._create_schema(conn)
                    await conn.execute(_PURGE_SCHEMA)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        self._pool = pool

    async def _create_schema(self, conn: Any) -> None:
        """Create or check the schema; the advisory lock makes concurrent opens take turns."""
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_NS, _SCHEMA_LOCK)
        if self.schema:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        found = await conn.fetchval("SELECT to_regclass('ledger_schema') IS NOT NULL")
        version = None
        if found:
            version = await conn.fetchval("SELECT max(version) FROM ledger_schema")
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"The session ledger at {self.target} has schema version {version}, "
                    f"newer than this code knows ({SCHEMA_VERSION}): upgrade the session "
                    "ledger to open it"
                )
            # A database made before group commit lacks ledger_append_group:
            # the script below only adds what is missing.
            if version == SCHEMA_VERSION and await conn.fetchval(
                "SELECT to_regproc('ledger_append_group') IS NOT NULL"
            ):
                await conn.execute(_ANCHORS_TABLE)
                return
        elif await conn.fetchval("SELECT to_regclass('ledger_events') IS NOT NULL"):
            raise StoreError(
                f"The database at {self.target} has ledger tables but no schema version: "
                "it was not written by the session ledger"
            )
        if version is not None and version < 4:
            await self._upgrade_to_4(conn, version)  # drops the append functions too
        elif version == 4:
            await conn.execute(_UPGRADE_4_TO_5)
        await conn.execute(
            _SCHEMA.format(
                user_lock_ns=_USER_LOCK_NS,
                lock_ns=_LOCK_NS,
                feed_lock=_FEED_LOCK,
                channel=self.channel,
                anchors_table=_ANCHORS_TABLE,
            )
        )
        # The script above replaced the functions of an older version in place.
        if version is not None and version < 2:
            await conn.execute(_UPGRADE_1_TO_2)
        if version != SCHEMA_VERSION:
            await conn.execute("INSERT INTO ledger_schema (version) VALUES ($1)", SCHEMA_VERSION)

    async def _upgrade_to_4(self, conn: Any, version: int) -> None:
        """``_UPGRADE_3_TO_4`` in the open's transaction: a row it cannot convert (an id
        that is not hex) refuses the open, naming it, and leaves the database as it was."""
        try:
            async with conn.transaction():  # a savepoint: the message below is ours
                await conn.execute(_UPGRADE_3_TO_4)
        except asyncpg.PostgresError as exc:
            raise StoreError(
                f"Cannot upgrade the session ledger at {self.target} from schema version "
                f"{version} to {SCHEMA_VERSION}: {exc}"
            ) from None

    async def _close(self) -> None:
        # Appends already queued are committed (or fail) first; new ones are
        # refused, the store being marked closed.
        await self._group.close()
        pool, self._pool = self._pool, None
        writer_conn, self._writer_conn = self._writer_conn, None
        async with self._listener_lock:
            listener, self._listener = self._listener, None
        self._notified.set()
        with _translate(self.target, doing="close"):
            try:
                if listener is not None:
                    await asyncio.wait_for(listener.close(), 5)
            except TimeoutError:
                listener.terminate()
            finally:
                if pool is not None:
                    try:
                        if writer_conn is not None and _usable(writer_conn):
                            await pool.release(writer_conn)  # close() waits for it
                    finally:
                        try:
                            await asyncio.wait_for(pool.close(), 10)
                        except TimeoutError:
                            pool.terminate()

    @contextlib.contextmanager
    def _translated(self, session_id: str | None = None, doing: str = "") -> Iterator[None]:
        """``_translate``; an error of a store closed meanwhile is ``StoreClosedError``."""
        try:
            with _translate(self.target, session_id=session_id, doing=doing):
                yield
        except StoreError:
            if self._closed:
                raise StoreClosedError(f"Store was closed: PostgreSQL at {self.target}") from None
            raise

    async def _call(self, method: str | _Run, sql: str, *args: Any) -> Any:
        """One statement on a pooled connection; a connection found broken is thrown away.

        ``method``: the connection's method to run it with, or a function of the
        connection that does. The pool would otherwise hand a connection the server
        terminated (or that asyncpg lost track of) to the next caller. When one is
        broken the others likely are too (a restart, a failover): all are replaced.
        """
        pool = self._pool
        async with pool.acquire() as conn:
            run = (
                getattr(conn, method)
                if isinstance(method, str)
                else functools.partial(method, conn)
            )
            try:
                return await run(sql, *args)
            except _CONNECTION_LOST:
                # asyncpg may already have detached a lost connection from its proxy.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                await pool.expire_connections()
                raise

    async def _write_call(self, method: str, sql: str, *args: Any) -> Any:
        """``_call`` for the group writer, on the connection it keeps between groups."""
        if self.pool_size == 1:  # keeping the only connection would starve the reads
            return await self._call(method, sql, *args)
        conn = self._writer_conn
        if conn is None or not _usable(conn):
            conn = self._writer_conn = await self._pool.acquire()
        try:
            return await getattr(conn, method)(sql, *args)
        except BaseException as exc:
            lost = isinstance(exc, _CONNECTION_LOST)
            # A statement the server refused leaves the connection fine (its
            # transaction rolled back); one lost, or interrupted mid-statement
            # (cancelled), is never used again.
            if lost or not isinstance(exc, asyncpg.PostgresError):
                self._writer_conn = None
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                if lost:  # the others likely are too: see _call
                    await self._pool.expire_connections()
            raise

    async def _fetch(self, sql: str, *args: Any, in_index_order: bool = False) -> list[_Row]:
        """A read. Reads are safe to repeat: one retry on a new connection when the
        pooled one turns out dead (after a server restart every pooled one is).

        ``in_index_order``: planned to read the rows in an index's order rather
        than sort them (``_fetch_in_index_order``).
        """
        self._check_open()
        method: str | _Run = _fetch_in_index_order if in_index_order else "fetch"
        for attempt in (1, 2):
            try:
                with self._translated():
                    rows: list[_Row] = await self._call(method, sql, *args)
                return rows
            except StoreClosedError:
                raise
            except StoreError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # writes

    async def append(self, request: AppendRequest) -> AppendResult:
        self._check_open()
        validate_request(request)
        if request.erase:  # rare: a transaction of its own, outside the groups
            with self._translated(request.session_id, "append"):
                row = await self._append_erasing(request, _append_args(request))
            return self._answer(request, row)
        return await self._group.submit((request, _append_args(request)))

    @property
    def group_stats(self) -> GroupStats:
        """How many groups this store has committed, and how many appends they held."""
        return self._group.stats

    async def _run_group(
        self, group: list[tuple[AppendRequest, _Args]]
    ) -> list[AppendResult | LedgerError]:
        """One group commit (``stores.group``): one statement, one transaction, one flush.

        ``ledger_append_group`` runs each request through ``ledger_append``, which
        writes nothing for a refused request, so a refusal needs no
        subtransaction. What only a failed statement can report (a batch
        repeating an event id, a deadlock with a foreign writer) rolls the whole
        group back; then each request is run alone, in a transaction of its own,
        and gets exactly the answer it would have had without grouping.
        """
        if self._pool is None:
            raise StoreClosedError(f"Store was closed: PostgreSQL at {self.target}")
        if len(group) == 1:
            # Alone, a request needs neither the group's locking up front nor its
            # loop: ledger_append itself costs less (about 0.2 ms of server time).
            return [await self._append_alone(*group[0])]
        # One array per argument of ledger_append: a value per request, except the
        # ids and keys of every request's events end to end (p_counts says whose).
        columns: list[Any] = [[] for _ in range(len(group[0][1]))]
        counts: list[int] = []
        for _, args in group:
            for column, value in zip(columns, args, strict=True):
                column.append(value)
            counts.append(len(args[_IDS_FIELD]))
        keys = [
            key
            for count, request_keys in zip(counts, columns[_KEYS_FIELD], strict=True)
            for key in (request_keys or [None] * count)
        ]
        columns[_IDS_FIELD] = [key for request_ids in columns[_IDS_FIELD] for key in request_ids]
        columns[_KEYS_FIELD] = _keys_arg(keys)
        arguments = [*columns[:_REQUEST_FIELDS], counts, *columns[_REQUEST_FIELDS:]]
        try:
            rows = await self._write_call("fetch", _APPEND_GROUP_SQL, *arguments)
        except Exception as exc:
            if isinstance(exc, _ONE_REQUESTS_FAULT):
                self._group.stats.split += 1
                return [await self._append_alone(request, args) for request, args in group]
            # The group failed whole (connection lost, server error): each caller
            # gets the error of its own append, naming its session.
            return [self._append_error(exc, request.session_id) for request, _ in group]
        if [row[0] for row in rows] != list(range(1, len(group) + 1)):
            raise StoreError(
                f"Unexpected answer from ledger_append_group at {self.target}: "
                f"{len(rows)} rows for {len(group)} appends"
            )
        outcomes: list[AppendResult | LedgerError] = []
        for (request, _), row in zip(group, rows, strict=True):
            try:
                outcomes.append(self._answer(request, row[1:]))
            except LedgerError as exc:
                outcomes.append(exc)
        return outcomes

    def _append_error(self, error: Exception, session_id: str) -> LedgerError:
        """The ledger's error for an append to ``session_id`` that failed with ``error``."""
        try:
            with self._translated(session_id, "append"):
                raise error
        except LedgerError as translated:
            return translated
        raise AssertionError("unreachable")  # _translated raised something else

    async def _append_alone(
        self, request: AppendRequest, args: _Args
    ) -> AppendResult | LedgerError:
        """One request in a transaction of its own; its error returned, not raised."""
        try:
            with self._translated(request.session_id, "append"):
                row = await self._write_call("fetchrow", _APPEND_SQL, *args)
            return self._answer(request, row)
        except LedgerError as exc:
            return exc

    def _answer(self, request: AppendRequest, row: _Row) -> AppendResult:
        """``ledger_append``'s answer (outcome, detail, position, id, data) as the result
        or the error of ``append``."""
        outcome: str = row[0]
        if outcome == "ok":
            self._wake()
            return AppendResult(list(request.events))
        if outcome == "replay":
            original = (row[2], row[3], row[1], row[4])  # o_detail: its session
            return AppendResult([_decode(original, self.target)], replayed=True)
        first = request.events[0]
        created = first.body if isinstance(first.body, SessionCreated) else None
        if outcome == "not_found":
            raise SessionNotFoundError(request.session_id)
        if outcome == "head":
            check_head(request, row[1])
        elif outcome == "exists":
            check_head(request, row[1])
            # A second SessionCreated for a live session id.
            raise BranchExistsError(request.session_id, request.branch, None)
        elif outcome == "open_sessions" and created is not None:
            assert request.max_open_sessions is not None
            raise SessionCapacityError(
                f"user {created.user_id!r}", "open sessions", request.max_open_sessions
            )
        elif outcome == "branches":
            assert request.max_branches is not None
            raise SessionCapacityError(
                f"session {request.session_id!r}", "branches", request.max_branches
            )
        raise StoreError(
            f"Unexpected answer from ledger_append at {self.target} "
            f"(session {request.session_id!r}): {outcome!r}"
        )

    async def _append_erasing(self, request: AppendRequest, args: tuple[Any, ...]) -> _Row:
        """``ledger_append`` and the overwrite of ``request.erase`` in one transaction.

        The session's row is locked first (as ``ledger_append`` does), so the checks
        see the latest commit. An UPDATE leaves the old tuple in the table's pages
        (and its TOAST table) until VACUUM reclaims the space, and in the server's
        write-ahead log until that is recycled: see the README.
        """
        session_id = request.session_id
        pool = self._pool
        async with pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.execute(
                        "SELECT 1 FROM ledger_sessions WHERE session_id = $1 FOR UPDATE",
                        session_id,
                    )
                    rows = await conn.fetch(
                        f"SELECT {_EVENT_COLUMNS} FROM ledger_events "
                        "WHERE session_id = $1 AND id = ANY($2::bytea[]) FOR UPDATE",
                        session_id,
                        [_id_key(erased.id) for erased in request.erase],
                    )
                    stored = {row[1]: _decode(row, self.target) for row in rows}
                    for erased in request.erase:
                        check_erase(request, stored.get(erased.id), erased)
                    row = await conn.fetchrow(_APPEND_SQL, *args)
                    if row[0] == "ok":
                        await conn.executemany(
                            "UPDATE ledger_events SET data = $3 WHERE session_id = $1 AND id = $2",
                            [(session_id, _id_key(e.id), _pack(e)) for e in request.erase],
                        )
                        await conn.execute(
                            "DELETE FROM ledger_snapshots WHERE session_id = $1", session_id
                        )
                    return row
            except _CONNECTION_LOST:
                conn.terminate()
                await pool.expire_connections()
                raise

    # retention

    async def idle_sessions(
        self,
        before: int,
        *,
        user_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[SessionRow]:
        if limit <= 0:
            return []
        start = parse_cursor(after) if after is not None else (None, None)
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM ledger_sessions "
            "WHERE last_activity_at < $1 AND ($2::text IS NULL OR user_id = $2) "
            "AND ($3::bigint IS NULL OR (last_activity_at, session_id) > ($3, $4::text)) "
            "ORDER BY last_activity_at, session_id LIMIT $5",
            before,
            user_id,
            start[0],
            start[1],
            limit,
        )
        return [_session_row(row) for row in rows]

    async def purge(self, requests: Sequence[PurgeRequest]) -> list[PurgeRecord]:
        self._check_open()
        if not requests:
            return []
        done: list[PurgeRecord] = []
        pool = self._pool
        with self._translated(doing="purge"):
            async with pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        # The batch's session rows, locked up front in the order group
                        # commits lock them (by id), so the two never deadlock.
                        await conn.execute(
                            "SELECT 1 FROM ledger_sessions WHERE session_id = ANY($1::text[]) "
                            "ORDER BY session_id FOR UPDATE",
                            [request.record.session_id for request in requests],
                        )
                        for request in requests:
                            if await _purge_one(conn, request.record):
                                done.append(request.record)
                except _CONNECTION_LOST:
                    conn.terminate()
                    await pool.expire_connections()
                    raise
        return done

    async def purges(
        self, *, user_id: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> PurgePage:
        limit = max(0, limit)
        if limit == 0:
            return PurgePage([])
        after = parse_cursor(cursor) if cursor is not None else (None, None)
        rows = await self._fetch(
            "SELECT session_id, record FROM ledger_purges "
            "WHERE ($1::text IS NULL OR user_id = $1) "
            "AND ($2::bigint IS NULL OR (purged_at, session_id) < ($2, $3::text)) "
            "ORDER BY purged_at DESC, session_id DESC LIMIT $4",
            user_id,
            after[0],
            after[1],
            limit + 1,
        )
        records = [_purge_record(row, self.target) for row in rows[:limit]]
        return PurgePage(records, purge_cursor(records[-1]) if len(rows) > limit else None)

    async def put_snapshots(
        self, session_id: str, key: str, states: Sequence[tuple[str, bytes]]
    ) -> None:
        self._check_open()
        latest = dict(states)  # one row per event: the last state given wins
        if not latest:
            return
        with self._translated(session_id):
            await self._call(
                "execute", _PUT_SNAPSHOTS_SQL, session_id, key, list(latest), list(latest.values())
            )

    async def put_anchor(self, session_id: str, anchor: bytes) -> None:
        self._check_open()
        with self._translated(session_id):
            await self._call(
                "execute",
                "INSERT INTO ledger_anchors (session_id, data) VALUES ($1, $2)",
                session_id,
                bytes(anchor),
            )

    async def anchors(self, session_id: str) -> list[bytes]:
        rows = await self._fetch(
            "SELECT data FROM ledger_anchors WHERE session_id = $1 ORDER BY n", session_id
        )
        return [bytes(row[0]) for row in rows]

    # reads

    async def get(self, event_id: str) -> Event:
        # No ORDER BY in SQL: without statistics (after a bulk load) the planner
        # would walk the feed's position index to the event instead of using the key.
        key = _id_key(event_id)
        rows = key and await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM ledger_events WHERE id = $1", key
        )
        if not rows:
            raise EventNotFoundError(event_id)
        return _decode(min(rows, key=lambda row: row[0]), self.target)

    async def find_by_key(self, session_id: str, key: str) -> Event | None:
        if not _is_session_id(session_id):
            self._check_open()
            return None  # never stored
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM ledger_events "
            "WHERE session_id = $1 AND idempotency_key = $2",
            session_id,
            key,
        )
        return _decode(rows[0], self.target) if rows else None

    async def find_created(self, user_id: str, key: str) -> Event | None:
        rows = await self._fetch(
            "SELECT e.position, encode(e.id, 'hex'), e.session_id::text, e.data "
            "FROM ledger_sessions AS s JOIN ledger_events AS e "
            "ON e.session_id = s.session_id::uuid AND e.idempotency_key = s.create_key "
            "WHERE s.user_id = $1 AND s.create_key = $2 ORDER BY e.position LIMIT 1",
            user_id,
            key,
        )
        return _decode(rows[0], self.target) if rows else None

    async def ancestors(self, event_id: str, limit: int | None = None) -> list[Event]:
        self._check_open()
        if limit is not None and limit <= 0:
            return []
        with gc_paused():  # a long path is a bulk read: see ledger.events.gc_paused
            rows = await self._path_rows(event_id, limit, _PATH_SQL)
            # Every row is of the session the first row names (the rest do not repeat it).
            events = _decode_session_rows(rows, rows[0][2], self.target)
            return check_ancestry(events, limit, f"at {self.target}")

    async def path_index(self, event_id: str, limit: int) -> list[tuple[str, int, str | None]]:
        """``(id, seq, parent)`` of up to ``limit`` events of the path from ``event_id``
        back, newest first, read from the columns alone: nothing is decoded or checked.

        For the fold engine's walk back to a snapshot (``projections.engine.PathIndex``),
        which reads the events it folds through ``ancestors``, with every check.
        """
        self._check_open()
        if limit <= 0:
            return []
        with gc_paused():
            rows = await self._path_rows(event_id, limit, _INDEX_PATH_SQL)
        return list(map(_get_index_entry, rows))

    async def _path_rows(self, event_id: str, limit: int | None, sql: _PathSQL) -> list[_Row]:
        """Rows ``(position, id, session_id, column, parent)`` of the parent path from
        ``event_id`` back, newest first, by the statements ``sql`` (``_PATH_SQL`` or
        ``_INDEX_PATH_SQL``): ``limit`` of them, or fewer at the root or where a parent
        is missing (the caller names that). Only the first row names its session.
        EventNotFoundError when ``event_id`` is unknown."""
        # Windows are backward range scans of (session_id, position). The first
        # finds the session by the event id (the primary key leads with it); every
        # query after it names the session (Citus routes it to one shard).
        first_sql, window_sql, chain_sql = sql
        key = _id_key(event_id)
        if key is None:
            self._check_open()
            raise EventNotFoundError(event_id)
        session: str | None = None

        # The cursors after the first are ids read back from the rows (hex): stored ids.
        async def window(cursor: str, below: int, want: int) -> list[_Row]:
            nonlocal session
            if session is None:  # walk_path starts from event_id, below no position
                rows = await self._fetch(first_sql, key, want)
                session = rows[0][2] if rows else None
                return rows
            return await self._fetch(window_sql, session, bytes.fromhex(cursor), below, want)

        async def chain(cursor: str, below: int, want: int) -> list[_Row]:
            return await self._fetch(chain_sql, session, bytes.fromhex(cursor), below, want)

        return await walk_path(event_id, limit, window, chain, size=_PATH_WINDOW)

    def events(self, session_id: str, *, page_size: int = 1000) -> AsyncIterator[Event]:
        return self.events_from(session_id, 0, page_size=page_size)

    async def event_pages(
        self, session_id: str, start: int = 0, *, page_size: int = 1000
    ) -> AsyncIterator[list[Event]]:
        page_size = max(1, page_size)
        if not _is_session_id(session_id):
            self._check_open()
            return  # never stored
        # The session's events as of now, as MemoryStore gives them; with its count, for
        # the plan of its pages (a single page is read the plain way: one round trip).
        rows = await self._fetch(
            "SELECT coalesce(max(position), 0), (SELECT event_count FROM ledger_sessions "
            "WHERE session_id = $2) FROM ledger_events WHERE session_id = $1",
            session_id,
            session_id,
        )
        upper: int = rows[0][0]
        in_index_order = (rows[0][1] or 0) - start > page_size
        after = 0
        if start > 0:  # the position of the event before the start-th: a seek in the index
            rows = await self._fetch(
                "SELECT position FROM ledger_events WHERE session_id = $1 ORDER BY position "
                "LIMIT 1 OFFSET $2",
                session_id,
                start - 1,
                in_index_order=True,
            )
            after = rows[0][0] if rows else upper
        while after < upper:
            with gc_paused():  # the rows too (tracked objects): a page is a bulk read
                rows = await self._fetch(
                    _PAGE_SQL, session_id, after, upper, page_size, in_index_order=in_index_order
                )
                events = _decode_session_rows(rows, session_id, self.target)
            if events:
                yield events
            if len(rows) < page_size:
                return
            after = rows[-1][0]

    async def heads(self, session_id: str) -> dict[str, str]:
        rows = await self._fetch(
            "SELECT t.branch, t.head FROM ledger_sessions AS s, "
            "unnest(s.branches, s.heads) AS t(branch, head) WHERE s.session_id = $1",
            session_id,
        )
        return {str(branch): str(head) for branch, head in rows}

    async def session(self, session_id: str) -> SessionRow:
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM ledger_sessions WHERE session_id = $1", session_id
        )
        if not rows:
            raise SessionNotFoundError(session_id)
        return _session_row(rows[0])

    async def sessions(self, query: SessionQuery) -> SessionPage:
        self._check_open()
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("user_id", query.user_id),
            ("agent", query.agent),
            ("status", query.status),
        ):
            if value is not None:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        if query.cursor is not None:
            at, session_id = parse_cursor(query.cursor)
            params.extend((at, session_id))
            where.append(f"(last_activity_at, session_id) < (${len(params) - 1}, ${len(params)})")
        limit = max(0, query.limit)
        if limit == 0:
            return SessionPage([])
        params.append(limit + 1)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM ledger_sessions {clause}"
            f"ORDER BY last_activity_at DESC, session_id DESC LIMIT ${len(params)}",
            *params,
        )
        page = [_session_row(row) for row in rows[:limit]]
        return SessionPage(page, page_cursor(page[-1]) if len(rows) > limit else None)

    async def get_snapshot(self, session_id: str, key: str, event_id: str) -> bytes | None:
        rows = await self._fetch(
            "SELECT state FROM ledger_snapshots "
            "WHERE session_id = $1 AND key = $2 AND event_id = $3",
            session_id,
            key,
            event_id,
        )
        return bytes(rows[0][0]) if rows else None

    # the feed

    async def read_feed(self, after: int = 0, limit: int = 1000) -> list[FeedItem]:
        self._check_open()
        if limit <= 0:
            return []
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM ledger_events WHERE position > $1 "
            "ORDER BY position LIMIT $2",
            max(after, 0),
            limit,
        )
        events = _decode_rows(rows, self.target)
        return list(map(FeedItem, map(_get_position, rows), events))

    def _wake(self) -> None:
        """Wake every feed waiter of this process (they then ask the server)."""
        notified, self._notified = self._notified, asyncio.Event()
        notified.set()

    def _on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._wake()

    def _on_listener_lost(self, connection: Any) -> None:
        if self._listener is connection:
            self._listener = None
        self._wake()  # waiters fall back to polling until it is back

    async def _listen(self) -> bool:
        """Make sure the ``LISTEN`` connection is up; False when it cannot be (poll instead)."""
        if self._listener is not None and not self._listener.is_closed():
            return True
        loop = asyncio.get_running_loop()
        if loop.time() < self._listener_retry_at:
            return False
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return True
            self._check_open()
            self._listener_retry_at = loop.time() + 1.0
            connection: Any = None
            try:
                with self._translated(doing="listen"):
                    connection = await asyncpg.connect(self._dsn, timeout=self.connect_timeout)
                    connection.add_termination_listener(self._on_listener_lost)
                    await connection.add_listener(self.channel, self._on_notify)
            except StoreError:
                if connection is not None:
                    connection.terminate()
                if self._closed:
                    raise
                return False
            self._listener = connection
            return True

    async def wait_for_feed(self, after: int, max_wait: float) -> None:
        """Return when a position above ``after`` has committed, or after ``max_wait``.

        Notifications from any process wake the waiter at once; while the
        listening connection is down, the highest position is polled.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, max_wait)
        while True:
            listening = await self._listen()
            notified = self._notified
            rows = await self._fetch("SELECT coalesce(max(position), 0) FROM ledger_events")
            remaining = deadline - loop.time()
            if rows[0][0] > after or remaining <= 0:
                return
            wait = remaining if listening else min(remaining, self.poll_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(notified.wait(), wait)
            self._check_open()

    async def subscribe(
        self,
        after: int = 0,
        *,
        session_id: str | None = None,
        kinds: Sequence[str] | None = None,
        page_size: int = 1000,
    ) -> AsyncGenerator[FeedItem, None]:
        """Catch up from ``after``, then follow new events as they commit.

        When the connection drops or the server restarts, the subscription
        retries (for up to ``reconnect_timeout`` seconds) from the last
        position it delivered: no event is skipped or delivered twice.
        """
        wanted = set(kinds) if kinds else None
        position = after
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        backoff = 0.05
        while True:
            self._check_open()
            try:
                items = await self.read_feed(position, page_size)
                if not items:  # caught up: wait for the next commit
                    await self.wait_for_feed(position, 1.0)
            except StoreClosedError:
                raise
            except StoreError:
                now = loop.time()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since > self.reconnect_timeout:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            failing_since, backoff = None, 0.05
            for item in items:
                position = item.position
                if session_id is not None and item.event.session != session_id:
                    continue
                if wanted is not None and item.event.kind not in wanted:
                    continue
                yield item
