"""Persistence behind one small Protocol, with SQLite (embedded) and Redis (distributed) backends."""
