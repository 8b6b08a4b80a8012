"""query role: fleetscribe_query, the role `db query` reads as on PostgreSQL

Revision ID: 0003
Revises: 0002

A READ ONLY transaction still lets a superuser (or a member of pg_execute_server_program,
pg_write_server_files, pg_read_server_files) run COPY ... TO PROGRAM or touch server files.
`db query` connected as such a user runs its statement as this NOLOGIN role, which may only
read table data (pg_read_all_data, PostgreSQL 14+). It is made here, by the one command that
changes a database, so that `db query` itself never creates or grants anything.

A role belongs to the server, not to one database: another fleetscribe database on the same
server may have made it already, and the downgrade leaves it. A migrating user that may not
create roles skips it; `db query` then refuses a privileged user (an ordinary one reads as
before). SQLite has no roles: nothing to do.
"""

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")

# Two databases on one server upgraded at once may both try to create the role: the
# second gets duplicate_object (or unique_violation on the catalog) and goes on.
_MAKE_ROLE = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleetscribe_query') THEN
        BEGIN
            CREATE ROLE fleetscribe_query NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF NOT pg_has_role('fleetscribe_query', 'pg_read_all_data', 'MEMBER') THEN
        GRANT pg_read_all_data TO fleetscribe_query;
    END IF;
END
$$
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if (bind.dialect.server_version_info or (0,)) < (14,):
        log.warning("fleetscribe_query not made: pg_read_all_data needs PostgreSQL 14 or newer")
        return
    may = bind.execute(
        sa.text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
    ).scalar()
    if not may:
        log.warning("fleetscribe_query not made: the migrating user may not create roles")
        return
    op.execute(_MAKE_ROLE)


def downgrade() -> None:
    # The role is the server's, possibly used by other fleetscribe databases: kept.
    pass
