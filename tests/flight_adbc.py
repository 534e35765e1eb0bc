"""Drives `crmcube serve` with the Python ADBC Flight SQL driver, as a BI notebook would.

Usage: flight_adbc.py URI USER PASSWORD. Prints one JSON object: what was refused (wrong
password, no credentials), the catalogs, tables and table types the server lists, and the rows
of a cube query run as a statement and as a prepared statement with a bound parameter. The Rust
test (tests/integration/flight.rs) checks them against crmcube's in-process answers.
"""
import json
import sys

import adbc_driver_flightsql.dbapi as flight_sql

uri, user, password = sys.argv[1:4]
report = {}


def refused(**db_kwargs):
    try:
        with flight_sql.connect(uri, db_kwargs=db_kwargs) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
        return "accepted"
    except Exception as e:  # the driver's own error types; the message is what matters
        return f"{type(e).__name__}: {e}"


report["wrong_password"] = refused(username=user, password="not-" + password)
report["no_credentials"] = refused()

with flight_sql.connect(uri, db_kwargs={"username": user, "password": password}) as conn:
    objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    report["catalogs"] = [c["catalog_name"] for c in objects]
    report["schemas"] = sorted(s["db_schema_name"] for c in objects for s in c["catalog_db_schemas"] or [])
    report["fact_sales_columns"] = [
        col["column_name"]
        for c in objects
        for s in c["catalog_db_schemas"] or []
        if s["db_schema_name"] == "warehouse"
        for t in s["db_schema_tables"] or []
        if t["table_name"] == "fact_sales"
        for col in t["table_columns"] or []
    ]
    report["tables"] = sorted(
        f'{s["db_schema_name"]}.{t["table_name"]}'
        for c in objects
        for s in c["catalog_db_schemas"] or []
        for t in s["db_schema_tables"] or []
    )
    report["table_types"] = conn.adbc_get_table_types()

    with conn.cursor() as cur:
        cur.execute(
            "SELECT customer_region, revenue FROM cubes.sales WHERE time_year = 2025 GROUP BY 1 ORDER BY 1"
        )
        table = cur.fetch_arrow_table()
        report["cube_query"] = [[str(v) for v in row.values()] for row in table.to_pylist()]

        cur.execute(
            "SELECT customer_region, revenue FROM cubes.sales WHERE time_year = ? GROUP BY 1 ORDER BY 1",
            parameters=(2025,),
        )
        report["prepared"] = [[str(v) for v in row] for row in cur.fetchall()]

print(json.dumps(report))
