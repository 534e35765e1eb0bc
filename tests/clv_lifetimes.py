"""Fits BG/NBD and Gamma-Gamma with the `lifetimes` package: the independent implementation
crmcube's fits are checked against (tests/integration/clv.rs).

Usage: clv_lifetimes.py SUMMARY.csv HORIZON MONTHS DISCOUNT. The CSV has customer_id,x,t_x,t,m
(repeat purchase days, recency and age in weeks, mean repeat value). Prints JSON: the fitted
parameters and, per customer, expected purchases in HORIZON weeks, probability alive, expected
average value and lifetime value over MONTHS months discounted by DISCOUNT a month
(`customer_lifetime_value` with freq "W").
"""
import csv
import json
import sys

import pandas as pd
from lifetimes import BetaGeoFitter, GammaGammaFitter

path, horizon, months, discount = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
with open(path) as f:
    rows = list(csv.DictReader(f))
d = pd.DataFrame({k: [float(r[k]) for r in rows] for k in ["x", "t_x", "t", "m"]})
bgf = BetaGeoFitter(penalizer_coef=0.0)
bgf.fit(d["x"], d["t_x"], d["t"])
repeat = d[(d["x"] > 0) & (d["m"] > 0)]
ggf = GammaGammaFitter(penalizer_coef=0.0)
ggf.fit(repeat["x"], repeat["m"])
expected = bgf.conditional_expected_number_of_purchases_up_to_time(horizon, d["x"], d["t_x"], d["t"])
alive = bgf.conditional_probability_alive(d["x"], d["t_x"], d["t"])
value = ggf.conditional_expected_average_profit(d["x"], d["m"].where(d["x"] > 0, 1.0))
clv = ggf.customer_lifetime_value(
    bgf, d["x"], d["t_x"], d["t"], d["m"].where(d["x"] > 0, 1.0), time=months, discount_rate=discount, freq="W"
)
json.dump(
    {
        "bgnbd": {k: float(v) for k, v in bgf.params_.items()},
        "gamma_gamma": {k: float(v) for k, v in ggf.params_.items()},
        "customers": [
            [rows[i]["customer_id"], float(expected[i]), float(alive[i]), float(value[i]), float(clv[i])]
            for i in range(len(rows))
        ],
    },
    sys.stdout,
)
