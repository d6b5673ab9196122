"""Operations: the migration SQL, doctor, prune, a local PostgreSQL server, and the demo."""
