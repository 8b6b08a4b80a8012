"""training: leases, progress and the outbox mark on training_runs; training_steps

Revision ID: 0004
Revises: 0003

- training_runs.state may be `cancelled` (the run_state CHECK is rebuilt).
- training_runs: progress of the last logged step (step, total_steps, epoch, loss,
  learning_rate, samples_per_s, eta_s), the lease of the training worker that holds it
  (attempts, lease_owner, lease_until), checkpoint_path, cancel_requested_at, the outbox
  mark (sent_at, task_id) and the recorded train/held-out split. Existing rows get step 0
  and attempts 0.
- training_steps: one row per logged step of one attempt, for the loss curve.

The downgrade turns cancelled runs into failed ones (reason "cancelled" unless they had
one): the older CHECK does not allow the state.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATES = ("queued", "running", "done", "failed")
_NEW_STATES = (*_OLD_STATES, "cancelled")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _state_check(states: tuple[str, ...]) -> str:
    return "state IN (" + ", ".join(f"'{s}'" for s in states) + ")"


@contextmanager
def _adapters_unlinked() -> Iterator[None]:
    """SQLite changes a CHECK by copying the table and dropping the old one; with foreign
    keys on (they are, and cannot be turned off inside the migration's transaction) that
    DROP fails while adapters point at its rows. Unlink them for the copy (ids are kept),
    then link them again. PostgreSQL alters the table in place: nothing to do."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    links = bind.execute(
        sa.text("SELECT id, training_run_id FROM adapters WHERE training_run_id IS NOT NULL")
    ).all()
    if links:
        op.execute("UPDATE adapters SET training_run_id = NULL")
    yield
    if links:
        bind.execute(
            sa.text("UPDATE adapters SET training_run_id = :run WHERE id = :id"),
            [{"id": id_, "run": run} for id_, run in links],
        )


def upgrade() -> None:
    # SQLite: the table is recreated with the new CHECK; PostgreSQL: ALTER TABLE in place.
    with _adapters_unlinked(), op.batch_alter_table("training_runs") as batch:
        batch.drop_constraint("run_state", type_="check")
        batch.create_check_constraint("run_state", _state_check(_NEW_STATES))
        batch.add_column(sa.Column("step", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("total_steps", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("epoch", sa.Float(), nullable=True))
        batch.add_column(sa.Column("loss", sa.Float(), nullable=True))
        batch.add_column(sa.Column("learning_rate", sa.Float(), nullable=True))
        batch.add_column(sa.Column("samples_per_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("eta_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("lease_owner", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("checkpoint_path", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("task_id", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("split", _JSON, nullable=True))
    op.create_index("ix_training_runs_lease_until", "training_runs", ["lease_until"])
    op.create_table(
        "training_steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("learning_rate", sa.Float(), nullable=True),
        sa.Column("grad_norm", sa.Float(), nullable=True),
        sa.Column("epoch", sa.Float(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["training_runs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "step", "attempt", name="uq_training_step"),
    )
    op.create_index("ix_training_steps_run_id", "training_steps", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_training_steps_run_id", table_name="training_steps")
    op.drop_table("training_steps")
    op.drop_index("ix_training_runs_lease_until", table_name="training_runs")
    op.execute(
        "UPDATE training_runs SET state = 'failed', reason = COALESCE(reason, 'cancelled') "
        "WHERE state = 'cancelled'"
    )
    with _adapters_unlinked(), op.batch_alter_table("training_runs") as batch:
        for column in (
            "split",
            "task_id",
            "sent_at",
            "cancel_requested_at",
            "checkpoint_path",
            "lease_until",
            "lease_owner",
            "attempts",
            "eta_s",
            "samples_per_s",
            "learning_rate",
            "loss",
            "epoch",
            "total_steps",
            "step",
        ):
            batch.drop_column(column)
        batch.drop_constraint("run_state", type_="check")
        batch.create_check_constraint("run_state", _state_check(_OLD_STATES))
