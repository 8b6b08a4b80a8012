"""query indexes: the CLI's and the sweep's queries by state at a million videos

Revision ID: 0006
Revises: 0005

Each index serves a query that, without it, read every video or the whole queued backlog
(benchmarks/store_scale.py, 1,000,000 videos, shows the plans before and after):

- ix_videos_state_finished (state, finished_at): the videos finished in the last minutes,
  `state IN ('done', 'failed') AND finished_at >= ?` (store.state_counts for
  `producer status`, store.finished_since for the window every feeder sizes), and the
  newest finish per state (`max(finished_at) ... WHERE state = ?`, one index step).
- ix_videos_state_started (state, started_at): the oldest start per state
  (`min(started_at) ... WHERE state = ?`, store.state_counts read one state at a time;
  under `state IN ('done', 'failed')` it still reads every finished video).
- ix_videos_state_worker (state, worker): the sweep's videos taken by a dead worker
  (store.orphaned: `state = 'running' OR state = 'queued' AND worker IS NOT NULL`), so
  every worker's sweep reads the few claimed rows, not the whole queued backlog: a
  BitmapOr on PostgreSQL, a MULTI-INDEX OR on a SQLite store without ANALYZE statistics
  (fleetscribe never runs ANALYZE; an analyzed SQLite reads the table, 0.2 s).

ix_videos_state (state) stays, though each of these begins with state: without it an
analyzed SQLite (no STAT4 statistics) reads the whole table for `state = ? ... ORDER BY
id` (stale_running, 0.4 ms with it against 250 ms without at a million videos) rather
than sort the few rows an index would find.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = {
    "ix_videos_state_finished": ["state", "finished_at"],
    "ix_videos_state_started": ["state", "started_at"],
    "ix_videos_state_worker": ["state", "worker"],
}


def upgrade() -> None:
    for name, columns in _INDEXES.items():
        op.create_index(name, "videos", columns)


def downgrade() -> None:
    for name in reversed(_INDEXES):
        op.drop_index(name, table_name="videos")
