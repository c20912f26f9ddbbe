"""The job database's first schema, for SQLite and PostgreSQL alike: files, jobs (with the lease a
worker holds while it runs one on PostgreSQL), events, checkpoints. `seq` orders rows by insertion:
an identity column on PostgreSQL, SQLite's AUTOINCREMENT rowid (never reused after a delete).

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def seq_column() -> sa.Column:
    return sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True)


def upgrade() -> None:
    op.create_table(
        "files",
        seq_column(),
        sa.Column("id", sa.Text, unique=True, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.BigInteger),
        sa.Column("format", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "jobs",
        seq_column(),
        sa.Column("id", sa.Text, unique=True, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.BigInteger),
        sa.Column("finished_at", sa.BigInteger),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("training_file", sa.Text, nullable=False),
        sa.Column("validation_file", sa.Text),
        sa.Column("suffix", sa.Text),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("metadata", sa.Text),
        sa.Column("hyperparameters", sa.Text, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("fine_tuned_model", sa.Text, unique=True),
        sa.Column("trained_tokens", sa.BigInteger),
        sa.Column("result_files", sa.Text, nullable=False, server_default="[]"),
        sa.Column("total_steps", sa.BigInteger),
        sa.Column("estimated_finish", sa.BigInteger),
        sa.Column("attempts", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("crashes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("worker_pid", sa.BigInteger),
        sa.Column("train_pid", sa.BigInteger),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires", sa.Float),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_by_status", "jobs", ["status", "seq"])
    op.create_table(
        "events",
        seq_column(),
        sa.Column("id", sa.Text, unique=True, nullable=False),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("level", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.Text),
        sa.Column("key", sa.Text),
        sa.UniqueConstraint("job_id", "key"),
        sqlite_autoincrement=True,
    )
    op.create_index("events_by_job", "events", ["job_id", "seq"])
    op.create_table(
        "checkpoints",
        seq_column(),
        sa.Column("id", sa.Text, unique=True, nullable=False),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.UniqueConstraint("job_id", "step"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    for table in ("checkpoints", "events", "jobs", "files"):
        op.drop_table(table)
