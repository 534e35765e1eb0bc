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


def active_files(table_dir, version):
    active = {}
    log = os.path.join(table_dir, "_delta_log")
    for v in range(version + 1):
        with open(os.path.join(log, f"{v:020d}.json")) as f:
            for line in f:
                action = json.loads(line)
                if "add" in action:
                    active[action["add"]["path"]] = True
                if "remove" in action:
                    active.pop(action["remove"]["path"], None)
    return [os.path.join(table_dir, p) for p in active]


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
