"""sampling: how each video's frames are chosen, and why each stored frame was taken

Revision ID: 0007
Revises: 0006

Frames are chosen uniformly, or by events: a uniform skeleton plus the moments that change
most (video/events.py). A video described both ways is two observations, so the mode is
part of a report's key.

- videos.sampling: the mode its message asks for ('uniform' | 'events'); NULL, as on every
  video from before, means the worker's setting (FLEETSCRIBE_SAMPLING).
- reports.sampling: the mode the video was to be described with; every report from before
  was 'uniform' (the server default, so they are not rewritten). It is in uq_report_key
  (video, model, adapter, prompt version, sampling).
  reports.sampling_note: why the sampler used uniform frames when 'events' was asked.
- reports.frames: each frame as chosen ({"t", "reason", "score"}); NULL on reports from
  before (their frames were uniform, at frame_timestamps). reports.event_frames: how many
  were taken for an event (0 before), so a filter needs no JSON functions.
- hazards.frame_reason, hazards.frame_score: the reason and change score of the frame a
  hazard points at; NULL on hazards from before.

SQLite changes a unique constraint by copying the table; the copy replaces `reports`, which
hazards point at (ON DELETE CASCADE). With foreign keys on, dropping the old table would
delete every hazard (deferring them, PRAGMA defer_foreign_keys, still runs the cascade):
env.py runs migrations with them off and checks them before commit, and this migration
refuses to run otherwise.

The downgrade refuses a store where a video has reports that differ only by sampling (the
old key cannot hold both): delete the ones to lose first.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_KEY = ["video_id", "model", "adapter", "prompt_version"]


def upgrade() -> None:
    _foreign_keys_off()
    op.add_column("videos", sa.Column("sampling", sa.String(length=16), nullable=True))
    op.add_column("hazards", sa.Column("frame_reason", sa.String(length=16), nullable=True))
    op.add_column("hazards", sa.Column("frame_score", sa.Float(), nullable=True))
    # NOT NULL with a server default: the rows from before get it without being rewritten
    # (PostgreSQL stores the default once; SQLite's copy below reads it).
    for column in (
        sa.Column("sampling", sa.String(length=16), server_default="uniform", nullable=False),
        sa.Column("sampling_note", sa.Text(), nullable=True),
        sa.Column(
            "frames",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("event_frames", sa.Integer(), server_default="0", nullable=False),
    ):
        op.add_column("reports", column)
    with op.batch_alter_table("reports") as batch:
        batch.drop_constraint("uq_report_key", type_="unique")
        batch.create_unique_constraint("uq_report_key", [*_OLD_KEY, "sampling"])


def downgrade() -> None:
    _foreign_keys_off()
    pairs = op.get_bind().scalar(
        sa.text(
            "SELECT count(*) FROM (SELECT 1 FROM reports GROUP BY "
            f"{', '.join(_OLD_KEY)} HAVING count(*) > 1) AS twice"
        )
    )
    if pairs:
        raise RuntimeError(
            f"cannot downgrade below 0007: {pairs} videos have reports that differ only by "
            "sampling, which the old report key cannot hold; delete the reports to lose first"
        )
    with op.batch_alter_table("reports") as batch:
        batch.drop_constraint("uq_report_key", type_="unique")
        batch.create_unique_constraint("uq_report_key", _OLD_KEY)
        for column in ("event_frames", "frames", "sampling_note", "sampling"):
            batch.drop_column(column)
    for table, column in (
        ("hazards", "frame_score"),
        ("hazards", "frame_reason"),
        ("videos", "sampling"),
    ):
        op.drop_column(table, column)


def _foreign_keys_off() -> None:
    """On SQLite, refuse to copy `reports` while foreign keys are on (see the docstring)."""
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "migration 0007 copies the reports table: on SQLite it runs with foreign keys off "
            "(db/migrations/env.py), or dropping the old table would delete every hazard"
        )
