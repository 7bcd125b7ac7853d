#!/usr/bin/env python3
"""The DuckDB baseline of `custos bench query`: the same five SOC queries over the same
Parquet segment files, timed the same way (one warm-up, then the median of --runs).
Prints JSON: {"version", "queries": {name: {"median_ms", "rows", "answer"}}}, where
"answer" is the result as sorted rows of plain values (timestamps as microseconds since
the epoch), which `custos bench query` compares with its own.

Needs `pip install duckdb`. Called by `custos bench query`; runnable alone:
    python3 scripts/bench-duckdb.py --segments STORE/logs/0/segments --agent did:key:... \
        --from '2026-11-01 00:00:00' --to '2026-11-02 00:00:00'
"""
import argparse
import datetime
import decimal
import json
import os
import statistics
import sys
import time

try:
    import duckdb
except ImportError:
    sys.exit("the DuckDB baseline needs the duckdb package: pip install duckdb")

EVENT = "application/vnd.custos.event+json"
FINDING = "application/vnd.custos.finding+json"


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def plain(value):
    """A value as `custos bench query` writes its own: integers, text, timestamps as
    microseconds since the epoch."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return (value - EPOCH) // datetime.timedelta(microseconds=1)
    if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        return int(value)
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", required=True, help="the store's segment directory")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--from", dest="start", required=True)
    parser.add_argument("--to", dest="end", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--only", action="append", default=[], help="run only this query (repeatable)")
    args = parser.parse_args()

    files = os.path.join(args.segments, "*.parquet")
    con = duckdb.connect()
    con.execute(f"SET threads = {args.threads}")
    con.execute("SET TimeZone = 'UTC'")
    # Views, like Custos's tables: decoded columns straight from the files, finding fields
    # from the signed payload JSON at query time.
    con.execute(f"CREATE VIEW log AS SELECT * FROM read_parquet('{files}')")
    con.execute(f"CREATE VIEW events AS SELECT * FROM log WHERE payload_type = '{EVENT}'")
    con.execute(
        "CREATE VIEW findings AS SELECT log_index, ts, agent, realm, "
        "json_extract_string(decode(payload), '$.id') AS id, "
        "json_extract_string(decode(payload), '$.severity') AS severity "
        f"FROM log WHERE payload_type = '{FINDING}'"
    )
    queries = {
        "agent_time_range": "SELECT log_index, ts, kind, action, target FROM events "
        f"WHERE agent = '{args.agent}' AND ts >= TIMESTAMPTZ '{args.start}+00' AND ts < TIMESTAMPTZ '{args.end}+00' "
        "ORDER BY log_index",
        "top_talkers": "SELECT agent, sum(bytes_out) AS bytes FROM events GROUP BY agent ORDER BY bytes DESC LIMIT 10",
        "rare_tools_per_realm": "SELECT realm, action, count(*) AS n FROM events WHERE kind = 'tool_call' "
        "GROUP BY realm, action HAVING count(*) < 100 ORDER BY realm, n, action",
        "findings_join_events": "SELECT f.id, f.severity, count(e.log_index) AS events FROM findings f JOIN events e "
        "ON e.agent = f.agent AND e.ts >= f.ts - INTERVAL 1 HOUR AND e.ts <= f.ts "
        "GROUP BY f.id, f.severity ORDER BY events DESC, f.id LIMIT 20",
        "kinds_per_hour": "SELECT date_trunc('hour', ts) AS hour, kind, count(*) AS n FROM events "
        "GROUP BY 1, 2 ORDER BY 1, 2",
    }
    results = {}
    for name, sql in queries.items():
        if args.only and name not in args.only:
            continue
        times = []
        rows = 0
        for run in range(args.runs + 1):
            started = time.perf_counter()
            # Materialised inside DuckDB (as Custos materialises Arrow batches), without
            # converting values to Python objects.
            con.execute(f"CREATE OR REPLACE TEMP TABLE answer AS {sql}")
            rows = con.execute("SELECT count(*) FROM answer").fetchone()[0]
            if run > 0:
                times.append(time.perf_counter() - started)
        answer = sorted(
            json.dumps([plain(value) for value in row], separators=(",", ":"), ensure_ascii=False)
            for row in con.execute("SELECT * FROM answer").fetchall()
        )
        results[name] = {"median_ms": statistics.median(times) * 1e3, "rows": rows, "answer": answer}
        print(f"duckdb  {name:<22} {results[name]['median_ms']:9.1f} ms  ({rows} rows)", file=sys.stderr)
    print(json.dumps({"version": duckdb.__version__, "queries": results}))


if __name__ == "__main__":
    main()
