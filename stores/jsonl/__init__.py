"""The JSONL store: one append-only text file per session, readable with ``less``.

Layout. ``jsonl:///path/to/dir`` keeps everything under one directory (mode
0700; every file in it is 0600)::

    dir/
      feed.log                        the global feed: one fixed-width line per event
      index                           the index saved at close: derived, safe to delete
      lock                            the writers' lock (flock) and the last write's intent
      purges.jsonl                    a purge record per purged session (and its positions)
      purge.redo                      a purge batch's records, while the batch runs
      snapshots/<session-id>.snap     projection snapshots: derived data, safe to delete
      sessions/
        <session-id>.jsonl            one per session, append-only
        <session-id>.jsonl.torn-<n>   a cut-short tail moved aside by recovery
      anchors/
        <session-id>.jsonl            the anchors the ledger issued, one JSON line each

Session files. The first line is a header naming the format, its version and
the session::

    {"ledger":"session-ledger/jsonl","version":2,"session":"<session-id>"}

and every line after it is one event, in append order::

    {"pos":17,"event":{...}}
    {"pos":18,"batch":[1,2],"parent":"<event id>","event":{...}}
    {"pos":19,"batch":[2,2],"status":"suspended","event":{...}}

``event`` is the event's msgspec JSON (``Event``'s field order) less its
``session`` (the header names it), its ``parent`` and its default values
(``idempotency_key`` null, ``format`` 1): the reader puts them back, so ids
and digests recompute from the file. ``pos`` is the event's position in the
global feed. ``batch`` is ``[i, n]``: the ``i``-th of the ``n`` events appended
together (left out for a batch of one); a batch counts only when all ``n``
lines are there, which makes a batch all or nothing. ``status``, on a batch's
last line, is the session's listing status after it (``active``,
``suspended``, ``closed`` or ``expired``, as ``ledger.Ledger`` sets it),
written only when it changes (so without one the status is unchanged, or
``active`` for a new session). ``parent`` is written only when it is not the
id of the event on the line before (a fork, a branch taken up again): a
linear run has none, and on the first line a left-out parent is null. A line
that cannot be rebuilt is an ``IntegrityError`` naming the file and line.
Lines have no length limit.

Version 1 files (before version 2) have ``batch`` on every line, ``status`` on
every batch given one, no ``parent`` field, and ``event`` exactly
``ledger.events.encode_event(event)``. They are still read, and keep getting
version 1 lines: a file has one version, its header's. New files are version 2.

The feed. ``feed.log`` starts with an 80-byte header line
(``{"ledger":"session-ledger/jsonl-feed","version":1}`` padded with spaces);
then line ``p + 1`` (byte ``80 * p``) is position ``p``::

    000000000000017 <session-id> 00000000000812 00000000603

(position, session, byte offset and length of the event's line in the session
file). Positions are 1, 2, 3, ... with no gap, so ``read_feed`` seeks straight
to a position. ``feed.log`` is an index: every record must match the session
line it names (a mismatch is an ``IntegrityError``), and when it is deleted
the next open rebuilds it from the ``pos`` fields of the session files.

Index. Heads, idempotency keys, event ids and the session listing are kept in
memory (about 200 bytes per event; event bodies are not: reads go back to the
files). Opening a store builds it by scanning every session file (about a
quarter of a million events per second) unless ``index`` is there: what a scan
found, saved at close by a store of at least ``_INDEX_FROM`` events (msgpack,
not synced, about 100 bytes per event), with the feed position it covers and
each session file's device, inode, size and modification time. Open then takes
a file whose stat is the saved one as indexed, scans one that grew from its
saved end (appends of other processes, a torn tail: every recovery rule
applies), and scans any other whole; a saved file gone or shorter, a
``feed.log`` that no longer holds the saved last record, or an index it cannot
read means the full scan, which names any damage. A file changed in the clock
tick of the save is saved without a stat (scanned whole next time), so a
rewrite that keeps the size cannot pass as the saved file. Damage written into
the saved part of a file that has also grown since is found when that part is
read, as damage done while a store is open always is.

Snapshots. ``snapshots/<session-id>.snap`` has one line per projection
snapshot, ``<event id> <projection key> <base64 state>``, appended (each write
after an empty line, which ends any line a crash left torn; not synced:
the states are derived from the session file and sealed by the fold engine, so
a lost or torn line only means a longer fold). A lookup searches the mapped
file for the newest line of its event and key; nothing is kept in memory.

Writing and durability. Appends are serialised across processes by an
exclusive ``flock`` on ``lock``. Under it a writer (1) reads whatever other
processes appended since its last look (the new records of ``feed.log``, then
the lines they name), (2) checks idempotency, the session, limits and the
branch head (``stores.base.check_head``), (3) records its intent (session,
offset, positions) in ``lock``'s first 78 bytes, through a shared mapping (no
system call, and the write seldom dirties ``lock``'s inode, which would join
the journal commit of the next ``fsync``; never synced: only a live process
needs it, an open scans), (4) appends the batch's lines to the session
file in one write and ``fsync``\\ s it (and the directory when the file is
new), and only then (5) appends the batch's records to ``feed.log``. An append
returns only after step 5, so an acknowledged event is on disk. Readers, in
this process or another, see an event only through its ``feed.log`` record,
so they never see one that is not yet on disk, nor half a batch. ``feed.log``
itself is not synced: after a power loss, missing records are rebuilt at open
from the (synced) session files. ``fsync=False`` (``?fsync=off``) skips the
syncs: an acknowledged append then survives a process crash but may be lost,
and a session file's tail may be damaged, after a power loss or OS crash.
A small append runs on the event loop's thread when the lock is free at once
and at most half of the last 16 writes + fsyncs took over 2 ms (a hop to a
worker thread costs about as much as the rest of the append; a disk that is
slow most of the time, not a stall now and then, is worth it); otherwise, and
for big batches, in a worker thread. The event loop's thread keeps up to 64
session files open.

Recovery. A writer killed between steps 3 and 5 leaves lines that no
``feed.log`` record names. The next writer (or the next open) finds them
through the intent: a complete, synced batch is adopted (its records are
written); anything else (a line cut short, an incomplete batch) is moved
aside to ``<session-id>.jsonl.torn-<n>``, logged (``logging``, logger
``stores.jsonl``) and listed in ``JSONLStore.recovered``, and the session goes
on. A line damaged anywhere else, a line that ``feed.log`` names but that is
missing or cut short, or a record that does not match its line, raises
``IntegrityError`` naming the file and line: nothing is skipped.

The global feed is in commit order: positions are assigned under the lock, in
the order the batches are written, and a reader only takes a position once
every record up to it is complete, so a tailing reader never skips one.

Retention. ``purge`` commits a batch by renaming ``purge.redo`` (its
``purges.jsonl`` lines, synced) into place under the writers' lock, then
appends the lines to ``purges.jsonl``, overwrites each purged position's
``feed.log`` record with a tombstone (``<position> <session-id> purged``),
removes the session's files and the redo file; the next writer or open
finishes a batch cut short after the rename (``retention.finish_purge``). Every process
reads new ``purges.jsonl`` lines before each write (under the lock) and each
read (when its size grew) and forgets those sessions, so it never appends to a
removed file. Positions stay taken: ``read_feed`` skips tombstones, and a
rebuilt ``feed.log`` gets them back from ``purges.jsonl``.

Anchors. ``anchors/<session-id>.jsonl`` holds the anchors the ledger issued
for a session, one per line, appended under the writers' lock and synced like
events. A last line without its newline is a write that never returned: it is
not read, and the next writer cuts it off.
"""

from stores.jsonl.format import FORMAT, FORMAT_VERSION
from stores.jsonl.lines import SessionLines, read_session_lines
from stores.jsonl.store import JSONLStore

__all__ = ["FORMAT", "FORMAT_VERSION", "JSONLStore", "SessionLines", "read_session_lines"]
