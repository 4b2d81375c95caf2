import psycopg

from sql.migrate import migrate


def test_migrate_twice_changes_nothing(db_url):
    with psycopg.connect(db_url) as conn:
        before = conn.execute("SELECT count(*), max(applied_at) FROM schema_migrations").fetchone()
        result = migrate(conn)
        after = conn.execute("SELECT count(*), max(applied_at) FROM schema_migrations").fetchone()
    assert result.applied == []
    assert before == after
