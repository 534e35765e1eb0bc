"""Counts the rows of one Delta table version with DuckDB, reading the Delta log by hand.

Usage: duckdb_count.py TABLE_DIR VERSION. The active files are the `add` actions minus the
`remove` actions of commits 0..=VERSION; DuckDB reads those Parquet files. Nothing of crmcube
or delta-rs is involved, so this checks that other engines can read the warehouse.
"""
import json
import os
import sys

import duckdb


def active_files(table, version):
    """The Parquet files of Delta table folder `table` at `version`: adds minus removes."""
    log = os.path.join(table, "_delta_log")
    active = {}
    for v in range(version + 1):
        with open(os.path.join(log, f"{v:020d}.json")) as f:
            for line in f:
                action = json.loads(line)
                if "add" in action:
                    active[action["add"]["path"]] = True
                if "remove" in action:
                    active.pop(action["remove"]["path"], None)
    return [os.path.join(table, p) for p in active]


if __name__ == "__main__":
    table, version = sys.argv[1], int(sys.argv[2])
    files = active_files(table, version)
    print(duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()[0][0])
