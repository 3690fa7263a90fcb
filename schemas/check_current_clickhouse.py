"""Runs every ClickHouse migration through chdb (the current ClickHouse engine, in process),
so the SQL is proven on today's ClickHouse as well as on the local 18.16 server.

usage: python check_current_clickhouse.py SCHEMAS_DIR [QUERIES_JSON]
Prints one line per statement; exits non-zero naming the file and statement that failed.
QUERIES_JSON, if given, is a list of {"name": ..., "sql": ...} run in order after the
migrations (the tests write the services' own statements there); the last line printed is
then "results " and a JSON object: each query's name to its rows, each row a list of its
fields as ClickHouse writes them in TSV.
"""
import json
import pathlib
import re
import sys
import tempfile

from chdb import session

# Same split as aggregator/src/migrate.rs: `;` at a line end, `--` comment lines dropped.
def statements(text):
    out, cur = [], []
    for line in text.splitlines():
        t = line.strip()
        if not t or t.startswith("--"):
            continue
        if t.endswith(";"):
            cur.append(t[:-1])
            out.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line.rstrip())
    if "".join(cur).strip():
        out.append("\n".join(cur).strip())
    return out


def adds_existing_column(stmt, error):
    """As aggregator/src/migrate.rs: 18.16 has no ADD COLUMN IF NOT EXISTS, so an
    ALTER TABLE ... ADD COLUMN of one column that finds it there counts as done."""
    s = stmt.lstrip().upper()
    return (
        s.startswith("ALTER TABLE")
        and s.count("ADD COLUMN") == 1
        and "column with this name already exists" in error
    )


def drops_missing_column(stmt, error):
    """As aggregator/src/migrate.rs: nor DROP COLUMN IF EXISTS, so an ALTER TABLE ...
    DROP COLUMN of one column that finds it gone counts as done."""
    s = stmt.lstrip().upper()
    return (
        s.startswith("ALTER TABLE")
        and s.count("DROP COLUMN") == 1
        and ("Cannot find column" in error or "There is no column" in error)
    )


def main():
    schemas = pathlib.Path(sys.argv[1])
    files = sorted(
        (p for p in schemas.glob("V*__*.sql")),
        key=lambda p: int(re.match(r"V(\d+)__", p.name).group(1)),
    )
    if not files:
        sys.exit(f"no migrations in {schemas}")
    with tempfile.TemporaryDirectory() as tmp:
        s = session.Session(tmp)
        version = s.query("SELECT version()", "CSV").data().strip().strip('"')
        print(f"chdb ClickHouse {version}")
        s.query("CREATE DATABASE IF NOT EXISTS tally")
        s.query("USE tally")
        s.query(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version UInt32, name String, checksum String, applied_at DateTime('UTC')) "
            "ENGINE = MergeTree ORDER BY version"
        )
        for f in files:
            for i, stmt in enumerate(statements(f.read_text())):
                for attempt in ("first", "again"):  # every statement must be re-runnable
                    try:
                        s.query(stmt)
                    except Exception as e:  # noqa: BLE001 - report any engine error
                        if attempt == "again" and (
                            adds_existing_column(stmt, str(e)) or drops_missing_column(stmt, str(e))
                        ):
                            continue
                        sys.exit(f"{f.name} statement {i + 1} ({attempt} run) failed: {e}\n{stmt}")
                print(f"ok {f.name} statement {i + 1}")
        # The raw table takes a row the way the aggregator writes it.
        s.query(
            "INSERT INTO events_raw VALUES ('demo', 'c1', 'e1', 'request', "
            "toDateTime('2026-11-24 10:00:00', 'UTC'), 500000000, now(), '', '{}', 0, 0)"
        )
        n = s.query("SELECT count() FROM events_raw WHERE tenant = 'demo'", "CSV").data().strip()
        if n != "1":
            sys.exit(f"events_raw round trip returned {n!r}")
        print(f"ok {len(files)} migration file(s) on ClickHouse {version}")
        if len(sys.argv) > 2:
            queries = json.loads(pathlib.Path(sys.argv[2]).read_text())
            results = {}
            for q in queries:
                try:
                    rows = s.query(q["sql"], "TSV").data()
                except Exception as e:  # noqa: BLE001 - report any engine error
                    sys.exit(f"query {q['name']} failed: {e}\n{q['sql']}")
                results[q["name"]] = [line.split("\t") for line in rows.splitlines()]
            print(f"ok {len(queries)} query(ies) on ClickHouse {version}")
            print("results " + json.dumps(results))


if __name__ == "__main__":
    main()
