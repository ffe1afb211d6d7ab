"""Alembic migrations of the catalog schema (imports only engine.catalog models)."""
