"""Token vault: convergent tokens, encrypted originals, SQLite and PostgreSQL backends."""
