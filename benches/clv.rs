//! Time to fit the lifetime value models on a large customer base.
//!
//! `cargo bench --bench clv` draws `CRMCUBE_BENCH_CUSTOMERS` customers (default 1,000,000) from
//! known BG/NBD parameters (`analytics::clv::simulate`), fits BG/NBD, and prints the time, the
//! parameters against the true ones, and the log-likelihood. (Gamma-Gamma's fit costs the same
//! order per customer with three parameters instead of four.)

use std::time::Instant;

use crmcube::analytics::clv::{fit_bgnbd, simulate};

fn main() {
    let n: usize = std::env::var("CRMCUBE_BENCH_CUSTOMERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let (r, alpha, a, b) = (0.8, 5.0, 0.9, 3.0);
    let started = Instant::now();
    let customers = simulate(n, r, alpha, a, b, 104.0, 11);
    println!("simulated {n} customers over 104 weeks in {:.2} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    let fit = fit_bgnbd(&customers).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!("BG/NBD fit of {n} customers: {seconds:.2} s");
    println!("{:>8} {:>10} {:>10}", "", "true", "fitted");
    for (name, want, got) in [("r", r, fit.r), ("alpha", alpha, fit.alpha), ("a", a, fit.a), ("b", b, fit.b)] {
        println!("{name:>8} {want:>10.4} {got:>10.4}");
    }
    println!("log-likelihood {:.1}", fit.log_likelihood);
}
