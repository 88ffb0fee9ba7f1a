"""Persistence behind one small Protocol: SQLite (embedded) and Redis (distributed)."""
