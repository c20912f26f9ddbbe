"""Alembic's environment for the job database (SQLite or PostgreSQL): online migrations only, one
process at a time (on PostgreSQL an advisory lock, so workers and replicas starting together do not
race; on SQLite the store holds a lock file beside the database, qforge.jobs.db.migrate_sqlite)."""
from alembic import context
from sqlalchemy import create_engine, text

MIGRATION_LOCK = 0x71F09E  # pg_advisory_xact_lock key: "qforge migrations"


def run() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as connection:
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            context.configure(connection=connection, target_metadata=None, transaction_per_migration=False)
            context.run_migrations()
    engine.dispose()


run()
