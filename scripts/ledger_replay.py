#!/usr/bin/env python3
"""What ClickHouse spends on the aggregator's flushes, by insert size.

Replays ledger rows the real aggregator wrote, grouped into more or fewer inserts, into a
fresh database with the project's schema, and prints the ClickHouse server's CPU for each
grouping (from /proc, until its merges settle) and the inserts' own user and system time
(from system.query_log). Runs against the stack's ClickHouse (`make stack-up`); nothing
else should be using it meanwhile.

  1. prepare DB      the schema in DB, with `ingest_ledger` turned into a Log table that
                     keeps every row a flush sends (the views that route them are dropped);
  2. run the collector and `tally-aggregator run` with TALLY_CLICKHOUSE_DATABASE=DB (and a
     topic and group of their own), send them a load, stop the aggregator once drained;
  3. capture DB G OUT  writes the rows as RowBinary files of G consecutive flushes each;
  4. replay OUT...     each folder's files as inserts into a fresh database, 3 rounds.

Example: `scripts/ledger_replay.py capture cap 1 /tmp/g1` and `... capture cap 4 /tmp/g4`,
then `scripts/ledger_replay.py replay /tmp/g1 /tmp/g4`.

  order [EVENTS]     what sending a flush's events in `events_raw`'s order saves the server:
                     one synthetic flush of EVENTS event rows (default 125,000; the aggregator
                     bench's shape: 3,000 customers, four types, times over four hours) with
                     its rollup and checkpoint rows, inserted 8 times into a fresh database
                     as generated and 8 times sorted by (tenant, customer, type, time, id),
                     3 rounds alternating.
"""

import glob
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = os.environ.get("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:18123")
PID_FILE = os.path.join(ROOT, ".stack", "clickhouse", "clickhouse.pid")
KIND_CHECKPOINT = 3


def query(sql, body=None, **settings):
    params = dict(settings)
    if body is not None:
        params["query"] = sql
    url = URL + "/?" + urllib.parse.urlencode(params)
    data = sql.encode() if body is None else body
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=300) as r:
        return r.read()


def migrate(database):
    env = dict(os.environ, TALLY_CLICKHOUSE_DATABASE=database, TALLY_CLICKHOUSE_URL=URL)
    binary = os.path.join(ROOT, "target", "release", "tally-aggregator")
    config = os.path.join(ROOT, "config", "tally.dev.toml")
    subprocess.run([binary, "migrate", "--config", config], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def columns(database):
    rows = query(f"DESCRIBE TABLE {database}.ingest_ledger FORMAT TSV").decode()
    return [line.split("\t")[0] for line in rows.split("\n") if line]


def prepare(database):
    migrate(database)
    create = query(f"SHOW CREATE TABLE {database}.ingest_ledger FORMAT TSVRaw").decode()
    views = query(f"SELECT name FROM system.tables WHERE database = '{database}' "
                  "AND name LIKE 'ledger_%' FORMAT TSV").decode().split()
    for view in views:
        query(f"DROP TABLE {database}.{view}")
    query(f"DROP TABLE {database}.ingest_ledger")
    query(create.replace("ENGINE = Null", "ENGINE = Log"))
    print(f"{database}.ingest_ledger is now a Log table; {len(views)} views dropped")


def capture(database, group, out):
    kinds = [int(k) for k in query(
        f"SELECT kind FROM {database}.ingest_ledger FORMAT TSV", max_threads=1).split()]
    # A flush's rows end with its checkpoint rows (see the aggregator's ledger).
    ends = [i + 1 for i, k in enumerate(kinds)
            if k == KIND_CHECKPOINT and (i + 1 == len(kinds) or kinds[i + 1] != KIND_CHECKPOINT)]
    flushes = list(zip([0] + ends[:-1], ends))
    os.makedirs(out, exist_ok=True)
    cols = ", ".join(columns(database))
    for n, j in enumerate(range(0, len(flushes), group)):
        first, last = flushes[j][0], flushes[min(j + group, len(flushes)) - 1][1]
        body = query(f"SELECT {cols} FROM {database}.ingest_ledger LIMIT {first}, "
                     f"{last - first} FORMAT RowBinary", max_threads=1)
        with open(os.path.join(out, f"insert{n:03d}.bin"), "wb") as f:
            f.write(body)
    events = kinds.count(1)
    with open(os.path.join(out, "events"), "w") as f:
        f.write(str(events))
    print(f"{len(flushes)} flushes, {events} events -> {n + 1} inserts in {out}")


def server_cpu():
    with open(PID_FILE) as f:
        pid = int(f.read().strip())
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replay_once(folder, database):
    query(f"DROP DATABASE IF EXISTS {database}")
    migrate(database)
    cols = ", ".join(columns(database))
    files = sorted(glob.glob(os.path.join(folder, "insert*.bin")))
    time.sleep(0.3)
    before = server_cpu()
    for n, path in enumerate(files):
        with open(path, "rb") as f:
            query(f"INSERT INTO {database}.ingest_ledger ({cols}) FORMAT RowBinary", f.read(),
                  max_insert_block_size=1_000_000, log_queries=1,
                  query_id=f"{database}_{n}")
    quiet = 0
    while quiet < 6:  # no merge running for 300 ms
        time.sleep(0.05)
        running = int(query(f"SELECT count() FROM system.merges WHERE database = '{database}'"))
        quiet = quiet + 1 if running == 0 else 0
    cpu = server_cpu() - before
    query("SYSTEM FLUSH LOGS")
    user, system = query(
        "SELECT sum(ProfileEvents.Values[indexOf(ProfileEvents.Names, 'UserTimeMicroseconds')]) / 1e6, "
        "sum(ProfileEvents.Values[indexOf(ProfileEvents.Names, 'SystemTimeMicroseconds')]) / 1e6 "
        f"FROM system.query_log WHERE type = 2 AND query_id LIKE '{database}\\_%' FORMAT TSV"
    ).decode().split()
    query(f"DROP DATABASE {database}")
    return len(files), cpu, float(user), float(system)


def replay(folders, rounds=3):
    results = {f: [] for f in folders}
    run = int(time.time())
    for r in range(rounds):
        for folder in (folders if r % 2 == 0 else folders[::-1]):
            database = f"ledger_replay_{run}_{r}_{folders.index(folder)}"
            inserts, cpu, user, system = replay_once(folder, database)
            results[folder].append(cpu)
            print(f"{folder}: round {r + 1}: {inserts} inserts, server CPU {cpu:.2f} s "
                  f"(inserts' own user {user:.2f} s, system {system:.2f} s)", flush=True)
    for folder, cpus in results.items():
        with open(os.path.join(folder, "events")) as f:
            events = int(f.read())
        median = sorted(cpus)[len(cpus) // 2]
        print(f"{folder}: median server CPU {median:.2f} s = "
              f"{median / events * 1e6:.2f} CPU s per million events")


def synthetic_flush(database, events):
    """A flush-shaped ledger in DB (a Log table): the events, about a quarter as many
    rollup rows and a few unique-value rows, and 8 checkpoints."""
    prepare(database)
    now = int(time.time())
    query(f"""INSERT INTO {database}.ingest_ledger (kind, tenant, customer, id, type, time,
        time_nanos, received_at, data, kafka_partition, kafka_offset)
      SELECT 1, 'demo', concat('customer-', toString(10000 + (number * 7919) % 3000)),
        concat('run-1764040000-', toString(number)),
        ['request', 'completion', 'storage', 'login'][number % 4 + 1],
        toDateTime({now} - (number * 7) % 14400), 123456789, toDateTime({now}),
        ['{{"endpoint":"/v1/chat","status":200}}', '{{"tokens":1234,"model":"large"}}',
         '{{"gb":55.5}}', '{{"user":"user-1234"}}'][number % 4 + 1],
        number % 8, number
      FROM numbers({events})""")
    query(f"""INSERT INTO {database}.ingest_ledger (kind, tenant, customer, meter, hour,
        dim_values, d_count, d_sum, d_min, d_max, d_latest, d_latest_at)
      SELECT 2, 'demo', concat('customer-', toString(10000 + number % 3000)),
        ['requests@a', 'tokens@b', 'storage_gb@c'][number % 3 + 1],
        toStartOfHour(toDateTime({now} - 3600 * (number % 4))),
        [['/v1/chat'], ['large'], []][number % 3 + 1], 3, toDecimal128(1234.5, 9),
        toDecimal128(1, 9), toDecimal128(1000, 9), toDecimal128(55.5, 9), number
      FROM numbers({events // 4})""")
    query(f"""INSERT INTO {database}.ingest_ledger (kind, tenant, customer, meter, hour,
        d_count, d_unique)
      SELECT 2, 'demo', concat('customer-', toString(10000 + number % 3000)), 'active_users@d',
        toStartOfHour(toDateTime({now} - 3600 * (number % 4))), 1,
        concat('user-', toString(number % 5000))
      FROM numbers({events // 8})""")
    query(f"""INSERT INTO {database}.ingest_ledger (kind, topic, kafka_partition, kafka_offset,
        received_at)
      SELECT 3, 'usage', number, {events}, toDateTime({now}) FROM numbers(8)""")


def order(events=125_000, inserts=8, rounds=3):
    source = f"ledger_order_{int(time.time())}"
    synthetic_flush(source, events)
    cols = ", ".join(columns(source))
    bodies = {
        "as generated": query(f"SELECT {cols} FROM {source}.ingest_ledger FORMAT Native",
                              max_threads=1),
        "sorted": query(f"SELECT {cols} FROM {source}.ingest_ledger ORDER BY kind, tenant, "
                        "customer, type, time, id FORMAT Native", max_threads=1),
    }
    query(f"DROP DATABASE {source}")
    results = {name: [] for name in bodies}
    for r in range(rounds):
        names = list(bodies) if r % 2 == 0 else list(bodies)[::-1]
        for name in names:
            database = f"{source}_{r}_{list(bodies).index(name)}"
            migrate(database)
            time.sleep(0.3)
            before = server_cpu()
            for _ in range(inserts):
                query(f"INSERT INTO {database}.ingest_ledger ({cols}) FORMAT Native",
                      bodies[name])
            quiet = 0
            while quiet < 6:  # no merge running for 300 ms
                time.sleep(0.05)
                running = int(query("SELECT count() FROM system.merges "
                                    f"WHERE database = '{database}'"))
                quiet = quiet + 1 if running == 0 else 0
            cpu = server_cpu() - before
            query(f"DROP DATABASE {database}")
            results[name].append(cpu)
            print(f"{name}: round {r + 1}: {inserts} inserts of {events} events, "
                  f"server CPU {cpu:.2f} s", flush=True)
    total = inserts * events
    for name, cpus in results.items():
        median = sorted(cpus)[len(cpus) // 2]
        print(f"{name}: median server CPU {median:.2f} s = "
              f"{median / total * 1e6:.2f} CPU s per million events")


def main(argv):
    if len(argv) >= 2 and argv[0] == "prepare":
        prepare(argv[1])
    elif len(argv) == 4 and argv[0] == "capture":
        capture(argv[1], int(argv[2]), argv[3])
    elif len(argv) in (1, 2) and argv[0] == "order":
        order(*(int(a) for a in argv[1:]))
    elif len(argv) >= 2 and argv[0] == "replay":
        replay(argv[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
