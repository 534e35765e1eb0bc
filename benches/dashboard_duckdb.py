"""The DuckDB side of `cargo bench --bench dashboard`: the same dashboard over the same Parquet files.

Reads a JSON request on stdin: {"warehouse": DIR, "tables": {name: version}, "runs": N,
"queries": [{"name": ..., "sql": ...}]}. Each table's active Parquet files at its snapshot version
are found by reading the Delta log by hand (adds minus removes), then exposed to DuckDB as a view
over read_parquet. Each query runs once to warm up and N times timed; the answer is JSON on stdout:
[{"name", "millis": [..], "rows": [[cell as text, ...], ...]}].
"""
import json
import os
import sys
import time

import duckdb

# The Delta log is read by the same code as the test that checks DuckDB reads the warehouse.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from duckdb_count import active_files  # noqa: E402


def text(v):
    return "" if v is None else str(v)


def main():
    req = json.load(sys.stdin)
    con = duckdb.connect()
    for name, version in req["tables"].items():
        files = active_files(os.path.join(req["warehouse"], "tables", name), version)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({files!r})")
    out = []
    for q in req["queries"]:
        rows = con.execute(q["sql"]).fetchall()
        millis = []
        for _ in range(req["runs"]):
            t = time.perf_counter()
            con.execute(q["sql"]).fetchall()
            millis.append((time.perf_counter() - t) * 1000)
        out.append({"name": q["name"], "millis": millis, "rows": [[text(c) for c in r] for r in rows]})
    json.dump(out, sys.stdout)


main()
