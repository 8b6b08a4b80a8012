"""delivery: the outbox mark on videos and worker heartbeats

Revision ID: 0002
Revises: 0001

- videos.published_at: when the broker confirmed the video's current message; NULL while
  a queued video's message is not known to be sent (the producer died, the broker hung),
  so `producer enqueue`, `producer reap` and the workers' sweep send it again.
- workers: one row per describe worker process (host:pid), its heartbeat renewed while it
  runs; a video running on a worker whose heartbeat lapsed is sent again at once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("videos") as batch:
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    # Rows from before the outbox were sent as they were written.
    op.execute("UPDATE videos SET published_at = updated_at WHERE state IN ('queued', 'running')")
    op.create_index("ix_videos_unpublished", "videos", ["state", "published_at"])
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_workers_heartbeat_at", table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_videos_unpublished", table_name="videos")
    with op.batch_alter_table("videos") as batch:
        batch.drop_column("published_at")
