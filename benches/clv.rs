//! Time to fit the lifetime value models on a large customer base.
//!
//! `cargo bench --bench clv` draws `CRMCUBE_BENCH_CUSTOMERS` customers (default 1,000,000) from
//! known BG/NBD parameters (`analytics::clv::simulate`) and spend from known Gamma-Gamma
//! parameters (`simulate_spend`), fits both models as a load does, and prints each fit's time,
//! the parameters against the true ones, and the log-likelihoods.

use std::time::Instant;

use crmcube::analytics::clv::{fit_bgnbd, fit_gamma_gamma, simulate, simulate_spend};

fn main() {
    let n: usize = std::env::var("CRMCUBE_BENCH_CUSTOMERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let (r, alpha, a, b) = (0.8, 5.0, 0.9, 3.0);
    let (p, q, v) = (6.0, 4.0, 15.0);
    let started = Instant::now();
    let mut customers = simulate(n, r, alpha, a, b, 104.0, 11);
    simulate_spend(&mut customers, p, q, v, 12);
    let repeat = customers.iter().filter(|c| c.x > 0.0).count();
    println!("simulated {n} customers ({repeat} with repeat purchases) over 104 weeks in {:.2} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    let bg = fit_bgnbd(&customers).unwrap();
    let bg_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let gg = fit_gamma_gamma(&customers).unwrap();
    let gg_seconds = started.elapsed().as_secs_f64();
    println!("BG/NBD fit of {n} customers: {bg_seconds:.2} s; Gamma-Gamma fit of {repeat}: {gg_seconds:.2} s");
    println!("{:>8} {:>10} {:>10}", "", "true", "fitted");
    for (name, want, got) in [("r", r, bg.r), ("alpha", alpha, bg.alpha), ("a", a, bg.a), ("b", b, bg.b), ("p", p, gg.p), ("q", q, gg.q), ("v", v, gg.v)] {
        println!("{name:>8} {want:>10.4} {got:>10.4}");
    }
    println!("log-likelihood BG/NBD {:.1}, Gamma-Gamma {:.1}", bg.log_likelihood, gg.log_likelihood);
}
