"""The database: schema (SQLAlchemy ORM), engine and migrations, the repository, retention."""
