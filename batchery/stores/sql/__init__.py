"""The SQL store adapter: SQLAlchemy Core on SQLite and PostgreSQL, with Alembic migrations.

A regular package, so that packaging ships it and the layer contracts see its imports."""
