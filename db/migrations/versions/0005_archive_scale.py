"""archive scale: SQL holds the backlog, batches resume, a fast dedupe key

Revision ID: 0005
Revises: 0004

- batches.key: a fingerprint of the `producer enqueue` command (its inputs, frames,
  priority); batches.completed_at: when its inputs were all found and recorded. A second
  run of the same command resumes the batch it left unfinished.
- videos.fast_key, videos.dedupe: the size-plus-sampled-blocks key every input gets, and
  which key decided the video's identity ('sha256' or 'fast').
- ix_videos_backlog replaces ix_videos_unpublished: the feeder takes queued videos whose
  message is not sent, highest priority first, oldest first, a window at a time.
- ix_submissions_batch_path: a resumed batch skips the paths it already recorded.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
    # Batches from before were recorded whole, in one transaction.
    op.execute("UPDATE batches SET completed_at = created_at")
    op.create_index("ix_batches_key", "batches", ["key"])
    with op.batch_alter_table("videos") as batch:
        batch.add_column(sa.Column("fast_key", sa.String(length=80), nullable=True))
        batch.add_column(sa.Column("dedupe", sa.String(length=8), nullable=True))
    op.execute("UPDATE videos SET dedupe = 'sha256' WHERE sha256 IS NOT NULL")
    op.create_index("ix_videos_fast_key", "videos", ["fast_key"])
    op.create_index("ix_videos_bytes", "videos", ["bytes"])
    op.drop_index("ix_videos_unpublished", table_name="videos")
    op.create_index(
        "ix_videos_backlog", "videos", ["state", "published_at", sa.text("priority DESC"), "id"]
    )
    op.create_index("ix_submissions_batch_path", "submissions", ["batch_id", "path"])


def downgrade() -> None:
    op.drop_index("ix_submissions_batch_path", table_name="submissions")
    op.drop_index("ix_videos_backlog", table_name="videos")
    op.create_index("ix_videos_unpublished", "videos", ["state", "published_at"])
    op.drop_index("ix_videos_bytes", table_name="videos")
    op.drop_index("ix_videos_fast_key", table_name="videos")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of `videos` would drop
    # the table that reports and submissions point at, which foreign keys refuse.
    op.drop_index("ix_batches_key", table_name="batches")
    for table, column in (
        ("videos", "dedupe"),
        ("videos", "fast_key"),
        ("batches", "completed_at"),
        ("batches", "key"),
    ):
        op.drop_column(table, column)
