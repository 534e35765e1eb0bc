//! Customer lifetime value: the BG/NBD purchase model and the Gamma-Gamma spend model, fitted by
//! maximum likelihood over the whole customer base (Fader, Hardie & Lee 2005; Fader & Hardie
//! 2013), with the conventions of the `lifetimes` package so that results can be compared:
//!
//! - `x` (frequency): repeat purchases = distinct purchase days after the first;
//! - `t_x` (recency): time from the first purchase to the last one;
//! - `t` (age): time from the first purchase to the end of observation;
//! - `m` (monetary): mean value of the repeat purchase days (a day's purchases summed);
//!
//! all times in one unit ([`Settings::time_unit`], weeks by default). The likelihoods are maximised over the logarithms of
//! the parameters (so they stay positive) with argmin's L-BFGS on their analytic gradients
//! (Nelder-Mead, derivative-free, when L-BFGS does not converge); `ln Γ` is libm's `lgamma`, its
//! derivative ψ the `special` crate's digamma, and the Gauss hypergeometric function a power
//! series (the argument is below 1 here).

use std::sync::Mutex;

use argmin::core::{CostFunction, Executor, Gradient, State};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::neldermead::NelderMead;
use argmin::solver::quasinewton::LBFGS;
use special::Gamma;

/// One customer's purchase history, summarised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Customer {
    pub x: f64,
    pub t_x: f64,
    pub t: f64,
    /// Mean value of the repeat purchases (unused when `x` is 0).
    pub m: f64,
}

/// Fitted BG/NBD parameters and the log-likelihood of the data at them (summed over customers).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BgNbd {
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
    pub log_likelihood: f64,
}

/// Fitted Gamma-Gamma parameters and their log-likelihood (over customers with repeat purchases).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct GammaGamma {
    pub p: f64,
    pub q: f64,
    pub v: f64,
    pub log_likelihood: f64,
}

fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// ψ, the derivative of `ln Γ`.
fn digamma(x: f64) -> f64 {
    x.digamma()
}

/// A log-likelihood split in two: the terms that depend on a customer only through `x` (the
/// `ln Γ` calls, most of the cost), and the customer's value given them. A fit computes the terms
/// once per evaluation for every whole `x` up to the largest — a customer base has few distinct
/// repeat counts — instead of once per customer; the value is the same float either way, since
/// it is the same operations in the same order.
struct Likelihood {
    terms: fn(&[f64], f64) -> [f64; 3],
    /// The customer's value given `x`'s terms and two logs of the customer ([`logs_of`]).
    ll: fn(&[f64], &[f64; 3], &Customer, [f64; 2]) -> f64,
    /// Which logs `ll` reads. True: `ln(p[1] + T)`, `ln(p[1] + t_x)` (BG/NBD's `ln(α + T)` and
    /// `ln(α + t_x)`), which a fit computes once per distinct age and recency (a few hundred:
    /// whole days in the time unit) rather than once per customer. False: `ln m` (Gamma-Gamma's
    /// mean spend), which does not depend on the parameters: a fit computes it once.
    logs: bool,
    /// The derivatives of `terms` by each parameter (`[term][parameter]`, parameters past the
    /// model's own 0).
    dterms: fn(&[f64], f64) -> [[f64; 4]; 3],
    /// The customer's gradient by each parameter, given `x`'s terms and their derivatives, the
    /// logs `ll` reads and, for BG/NBD, `1 / (α + T)` and `1 / (α + t_x)` (`inverses`).
    grad: CustomerGradient,
}

/// [`Likelihood::grad`]: (parameters, `x`'s terms, their derivatives, the customer, logs,
/// inverses) → the gradient by each parameter.
type CustomerGradient = fn(&[f64], &[f64; 3], &[[f64; 4]; 3], &Customer, [f64; 2], [f64; 2]) -> [f64; 4];

/// The logs `f` reads of one customer ([`Likelihood::logs`]), computed for it alone.
fn logs_of(f: &Likelihood, params: &[f64], c: &Customer) -> [f64; 2] {
    if f.logs { [(params[1] + c.t).ln(), (params[1] + c.t_x).ln()] } else { [c.m.ln(), 0.0] }
}

/// BG/NBD, parameters (r, α, a, b): `x`'s terms are a₁ and a₂ of Fader, Hardie & Lee, and the
/// part of a₄ without the recency.
const BGNBD: Likelihood = Likelihood {
    terms: |p, x| {
        let (r, alpha, a, b) = (p[0], p[1], p[2], p[3]);
        [
            ln_gamma(r + x) - ln_gamma(r) + r * alpha.ln(),
            ln_gamma(a + b) + ln_gamma(b + x) - ln_gamma(b) - ln_gamma(a + b + x),
            a.ln() - (b + x - 1.0).ln(),
        ]
    },
    ll: |p, terms, c, [ln_t, ln_t_x]| {
        let r = p[0];
        let [a1, a2, a4_x] = *terms;
        let x = c.x;
        let a3 = -(r + x) * ln_t;
        if x > 0.0 {
            let a4 = a4_x - (r + x) * ln_t_x;
            // ln(e^a3 + e^a4) = hi + ln(1 + e^(lo − hi)): one exp and one ln_1p a customer (the
            // greater term's exp is 1). libm's log and exp were the night's largest CPU cost.
            let (hi, lo) = if a3 >= a4 { (a3, a4) } else { (a4, a3) };
            a1 + a2 + hi + (lo - hi).exp().ln_1p()
        } else {
            a1 + a2 + a3
        }
    },
    logs: true,
    dterms: |p, x| {
        let (r, alpha, a, b) = (p[0], p[1], p[2], p[3]);
        let (psi_ab, psi_abx) = (digamma(a + b), digamma(a + b + x));
        [
            [digamma(r + x) - digamma(r) + alpha.ln(), r / alpha, 0.0, 0.0],
            [0.0, 0.0, psi_ab - psi_abx, psi_ab + digamma(b + x) - digamma(b) - psi_abx],
            [0.0, 0.0, 1.0 / a, -1.0 / (b + x - 1.0)],
        ]
    },
    grad: |p, terms, dterms, c, [ln_t, ln_t_x], [inv_t, inv_t_x]| {
        let r = p[0];
        let [_, _, a4_x] = *terms;
        let x = c.x;
        let mut g = [0.0; 4];
        for (j, g) in g.iter_mut().enumerate() {
            *g = dterms[0][j] + dterms[1][j];
        }
        if x > 0.0 {
            // ln(e^a3 + e^a4) moves by each term's share of the sum.
            let (a3, a4) = (-(r + x) * ln_t, a4_x - (r + x) * ln_t_x);
            let w4 = 1.0 / (1.0 + (a3 - a4).exp());
            let w3 = 1.0 - w4;
            g[0] -= w3 * ln_t + w4 * ln_t_x;
            g[1] -= (r + x) * (w3 * inv_t + w4 * inv_t_x);
            g[2] += w4 * dterms[2][2];
            g[3] += w4 * dterms[2][3];
        } else {
            g[0] -= ln_t;
            g[1] -= (r + x) * inv_t;
        }
        g
    },
};

/// Gamma-Gamma, parameters (p, q, v), over customers with `x` > 0.
const GAMMA_GAMMA: Likelihood = Likelihood {
    terms: |p, x| {
        let (p, q, v) = (p[0], p[1], p[2]);
        [ln_gamma(p * x + q) - ln_gamma(p * x) - ln_gamma(q) + q * v.ln(), p * x * x.ln(), 0.0]
    },
    ll: |p, terms, c, [ln_m, _]| {
        let (p, q, v) = (p[0], p[1], p[2]);
        let (x, m) = (c.x, c.m);
        terms[0] + (p * x - 1.0) * ln_m + terms[1] - (p * x + q) * (x * m + v).ln()
    },
    logs: false,
    dterms: |p, x| {
        let (p, q, v) = (p[0], p[1], p[2]);
        let psi_pxq = digamma(p * x + q);
        [[x * (psi_pxq - digamma(p * x)), psi_pxq - digamma(q) + v.ln(), q / v, 0.0], [x * x.ln(), 0.0, 0.0, 0.0], [0.0; 4]]
    },
    grad: |p, _, dterms, c, [ln_m, _], _| {
        let (p, q, v) = (p[0], p[1], p[2]);
        let (x, m) = (c.x, c.m);
        let spent = x * m + v;
        let ln_spent = spent.ln();
        [
            dterms[0][0] + dterms[1][0] + x * ln_m - x * ln_spent,
            dterms[0][1] - ln_spent,
            dterms[0][2] - (p * x + q) / spent,
            0.0,
        ]
    },
};

/// One customer's log-likelihood under `f` at `params`, its terms computed for it alone.
#[cfg(test)]
fn direct_ll(f: &Likelihood, params: &[f64], c: &Customer) -> f64 {
    (f.ll)(params, &(f.terms)(params, c.x), c, logs_of(f, params, c))
}

/// The distinct values of `value` over the customers, and each customer's index among them.
fn distinct(customers: &[Customer], value: fn(&Customer) -> f64) -> (Vec<f64>, Vec<u32>) {
    let mut values: Vec<u64> = customers.iter().map(|c| value(c).to_bits()).collect();
    values.sort_unstable();
    values.dedup();
    let index = customers.iter().map(|c| values.binary_search(&value(c).to_bits()).unwrap_or(0) as u32).collect();
    (values.into_iter().map(f64::from_bits).collect(), index)
}

/// The largest repeat count, when every one is a whole number small enough to tabulate.
fn tabulable(customers: &[Customer]) -> Option<usize> {
    let mut max = 0.0f64;
    for c in customers {
        if !(c.x >= 0.0 && c.x <= 1_000_000.0 && c.x.fract() == 0.0) {
            return None;
        }
        max = max.max(c.x);
    }
    Some(max as usize)
}

/// Customers per chunk of the parallel log-likelihood sum.
const LL_CHUNK: usize = 8192;

/// Mean negative log-likelihood as a function of log-parameters.
struct Problem<'a> {
    customers: &'a [Customer],
    f: &'a Likelihood,
    /// See [`tabulable`].
    max_x: Option<usize>,
    /// Distinct ages and recencies, and each customer's index in them (when `f.logs` and they
    /// are few enough to be worth it).
    ages: Option<(Vec<f64>, Vec<u32>)>,
    recencies: Option<(Vec<f64>, Vec<u32>)>,
    /// Each customer's `ln m`, when `f` reads it (not `f.logs`).
    spend_logs: Option<Vec<f64>>,
    /// The gradient computed with the last cost, at those log-parameters (L-BFGS asks for the
    /// cost and then the gradient at each point, and L-BFGS the gradient again at the point
    /// accepted; all come from one pass over the customers).
    last_gradient: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
    /// Whether a cost also computes the gradient (false for Nelder-Mead).
    with_gradient: bool,
}

impl<'a> Problem<'a> {
    /// `f` over `customers`. With `tabulate`, the per-`x` terms are computed once per whole `x`
    /// (see [`tabulable`]), and the logs of ages and recencies once per distinct value when
    /// there are at most a quarter as many as customers; else per customer (the same floats).
    fn new(customers: &'a [Customer], f: &'a Likelihood, tabulate: bool) -> Self {
        let few = |d: (Vec<f64>, Vec<u32>)| (tabulate && d.0.len() * 4 <= customers.len()).then_some(d);
        let (ages, recencies) = if f.logs { (few(distinct(customers, |c| c.t)), few(distinct(customers, |c| c.t_x))) } else { (None, None) };
        Problem {
            customers,
            f,
            max_x: tabulable(customers).filter(|_| tabulate),
            ages,
            recencies,
            spend_logs: (!f.logs).then(|| customers.iter().map(|c| logs_of(f, &[], c)[0]).collect()),
            last_gradient: Mutex::new(None),
            with_gradient: true,
        }
    }

    /// The same problem, without its cache; its costs compute the gradient too when
    /// `with_gradient`.
    fn renewed(&self, with_gradient: bool) -> Problem<'a> {
        Problem {
            customers: self.customers,
            f: self.f,
            max_x: self.max_x,
            ages: self.ages.clone(),
            recencies: self.recencies.clone(),
            spend_logs: self.spend_logs.clone(),
            last_gradient: Mutex::new(None),
            with_gradient,
        }
    }

    /// The mean negative log-likelihood at `log_params`, and its gradient by the log-parameters
    /// when `gradient` (else zeros). The value is the same float either way.
    fn evaluate(&self, log_params: &[f64], gradient: bool) -> (f64, Vec<f64>) {
        use rayon::prelude::*;
        let params: Vec<f64> = log_params.iter().map(|p| p.exp()).collect();
        let table: Option<Vec<[f64; 3]>> = self.max_x.map(|m| (0..=m).map(|x| (self.f.terms)(&params, x as f64)).collect());
        let dtable: Option<Vec<[[f64; 4]; 3]>> = self.max_x.filter(|_| gradient).map(|m| (0..=m).map(|x| (self.f.dterms)(&params, x as f64)).collect());
        // ln(α + v) and 1 / (α + v) for each distinct age or recency v.
        type Shifted<'d> = Option<(Vec<f64>, Vec<f64>, &'d [u32])>;
        fn shifted<'d>(alpha: f64, d: &'d Option<(Vec<f64>, Vec<u32>)>, gradient: bool) -> Shifted<'d> {
            d.as_ref().map(|(values, index)| {
                let inverses = if gradient { values.iter().map(|v| 1.0 / (alpha + v)).collect() } else { Vec::new() };
                (values.iter().map(|v| (alpha + v).ln()).collect(), inverses, index.as_slice())
            })
        }
        let (ages, recencies) = (shifted(params[1], &self.ages, gradient), shifted(params[1], &self.recencies, gradient));
        let one = |(i, c): (usize, &Customer)| -> (f64, [f64; 4]) {
            let logs = match (&self.spend_logs, &ages, &recencies) {
                (Some(ln_m), ..) => [ln_m[i], 0.0],
                (None, Some((ages, _, age_of)), Some((recencies, _, recency_of))) => [ages[age_of[i] as usize], recencies[recency_of[i] as usize]],
                _ => {
                    let direct = logs_of(self.f, &params, c);
                    [
                        ages.as_ref().map_or(direct[0], |(l, _, index)| l[index[i] as usize]),
                        recencies.as_ref().map_or(direct[1], |(l, _, index)| l[index[i] as usize]),
                    ]
                }
            };
            let terms = table.as_ref().map_or_else(|| (self.f.terms)(&params, c.x), |t| t[c.x as usize]);
            let value = (self.f.ll)(&params, &terms, c, logs);
            if !gradient {
                return (value, [0.0; 4]);
            }
            let inverses = if self.f.logs {
                let inverse = |d: &Shifted, v: f64| d.as_ref().map_or(1.0 / (params[1] + v), |(_, inv, index)| inv[index[i] as usize]);
                [inverse(&ages, c.t), inverse(&recencies, c.t_x)]
            } else {
                [0.0; 2]
            };
            let dterms = dtable.as_ref().map_or_else(|| (self.f.dterms)(&params, c.x), |t| t[c.x as usize]);
            (value, (self.f.grad)(&params, &terms, &dterms, c, logs, inverses))
        };
        // Fixed chunks summed in parallel, then their sums in order: the same total on any
        // number of threads (a load's tables must not depend on scheduling).
        let chunks: Vec<(f64, [f64; 4])> = self
            .customers
            .par_chunks(LL_CHUNK)
            .enumerate()
            .map(|(k, chunk)| {
                let (mut value, mut g) = (0.0, [0.0; 4]);
                for (i, c) in chunk.iter().enumerate() {
                    let (v, d) = one((k * LL_CHUNK + i, c));
                    value += v;
                    for j in 0..4 {
                        g[j] += d[j];
                    }
                }
                (value, g)
            })
            .collect();
        let n = self.customers.len() as f64;
        let total: f64 = chunks.iter().map(|c| c.0).sum();
        let mean = -total / n;
        let grad = (0..params.len()).map(|j| -chunks.iter().map(|c| c.1[j]).sum::<f64>() * params[j] / n).collect();
        (if mean.is_finite() { mean } else { f64::MAX }, grad)
    }
}

impl CostFunction for Problem<'_> {
    type Param = Vec<f64>;
    type Output = f64;

    fn cost(&self, log_params: &Self::Param) -> Result<f64, argmin::core::Error> {
        let (cost, gradient) = self.evaluate(log_params, self.with_gradient);
        if self.with_gradient {
            *self.last_gradient.lock().map_err(|_| argmin::core::Error::msg("a gradient cache was poisoned"))? = Some((log_params.clone(), gradient));
        }
        Ok(cost)
    }
}

impl Gradient for Problem<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;

    fn gradient(&self, log_params: &Self::Param) -> Result<Vec<f64>, argmin::core::Error> {
        // Kept, not taken: L-BFGS asks again at the point its line search accepted.
        let cached = self.last_gradient.lock().map_err(|_| argmin::core::Error::msg("a gradient cache was poisoned"))?;
        Ok(match cached.as_ref() {
            Some((at, gradient)) if at == log_params => gradient.clone(),
            _ => {
                drop(cached);
                self.evaluate(log_params, true).1
            }
        })
    }
}

/// Maximises `f` from `start` (positive parameters); returns the parameters and the summed
/// log-likelihood.
///
/// L-BFGS on the analytic gradient first: it stops where the gradient (of the mean, by the
/// log-parameters) is below [`GRADIENT_TOLERANCE`], a few dozen passes over the customers.
/// Should it fail or stop short of that, Nelder-Mead takes over from the start, restarted from
/// its own optimum until it stops improving (the usual guard against a simplex that collapsed
/// early): some hundreds of passes.
fn maximise(customers: &[Customer], f: &Likelihood, start: &[f64]) -> Result<(Vec<f64>, f64), String> {
    if customers.is_empty() {
        return Err("no customers to fit".into());
    }
    let problem = Problem::new(customers, f, true);
    let start: Vec<f64> = start.iter().map(|p| p.ln()).collect();
    let (best, best_cost) = match quasi_newton(&problem, start.clone()) {
        Ok(found) => found,
        Err(why) => {
            tracing::debug!("L-BFGS did not converge ({why}); Nelder-Mead instead");
            nelder_mead(&problem, start)?
        }
    };
    if !best_cost.is_finite() || best_cost == f64::MAX {
        return Err("the likelihood has no finite maximum for this data".into());
    }
    Ok((best.iter().map(|p| p.exp()).collect(), -best_cost * customers.len() as f64))
}

/// Where L-BFGS stops: the Euclidean norm of the mean negative log-likelihood's gradient by the
/// log-parameters, or a step that lowers the mean by less than [`COST_TOLERANCE`]. Rounding in the
/// sums over customers leaves the gradient at 1e-9 to 1e-7 near the optimum (measured on 5,000
/// simulated customers), where the cost no longer falls by more than its own rounding; the
/// optimum found is accepted below [`ACCEPTED_GRADIENT`], where the log-parameters are within
/// about 1e-6 of it, as close as Nelder-Mead's simplex came.
const GRADIENT_TOLERANCE: f64 = 1e-8;
/// See [`GRADIENT_TOLERANCE`].
const COST_TOLERANCE: f64 = 1e-14;
/// See [`GRADIENT_TOLERANCE`].
const ACCEPTED_GRADIENT: f64 = 1e-6;

/// L-BFGS from `start` (log-parameters): the optimum and its cost, or why it was not reached.
/// The best point it found is accepted when the gradient there is below [`ACCEPTED_GRADIENT`],
/// however the run ended (a line search may also fail in the rounding noise at the optimum).
fn quasi_newton(problem: &Problem, start: Vec<f64>) -> Result<(Vec<f64>, f64), String> {
    let solver = LBFGS::new(MoreThuenteLineSearch::new(), 7).with_tolerance_grad(GRADIENT_TOLERANCE).and_then(|s| s.with_tolerance_cost(COST_TOLERANCE)).map_err(|e| e.to_string())?;
    let result = Executor::new(problem.renewed(true), solver).configure(|s| s.param(start).max_iters(500)).run().map_err(|e| e.to_string())?;
    let state = result.state();
    let param = state.get_best_param().cloned().ok_or("no parameters")?;
    let (cost, gradient) = problem.evaluate(&param, true);
    let norm = gradient.iter().map(|v| v * v).sum::<f64>().sqrt();
    tracing::debug!(iterations = state.get_iter(), cost, gradient = norm, reason = ?state.get_termination_reason(), "L-BFGS run");
    if !cost.is_finite() || cost == f64::MAX || param.iter().any(|p| !p.is_finite()) {
        return Err(format!("it ended at a cost of {cost}"));
    }
    if !norm.is_finite() || norm >= ACCEPTED_GRADIENT {
        return Err(format!("it stopped with a gradient of norm {norm:e} ({:?})", state.get_termination_reason()));
    }
    Ok((param, cost))
}

/// Nelder-Mead from `start` (log-parameters), restarted from its own optimum until it stops
/// improving: the optimum and its cost.
fn nelder_mead(problem: &Problem, start: Vec<f64>) -> Result<(Vec<f64>, f64), String> {
    let mut best = start;
    let mut best_cost = f64::MAX;
    let (mut runs, mut iterations) = (0, 0);
    for _ in 0..8 {
        // The first run starts wide; a restart only checks that the simplex did not collapse
        // early around a point that is not the optimum, from a tenth of the size.
        let step = if runs == 0 { 0.5 } else { 0.05 };
        let mut simplex = vec![best.clone()];
        for i in 0..best.len() {
            let mut v = best.clone();
            v[i] += step;
            simplex.push(v);
        }
        let solver = NelderMead::new(simplex).with_sd_tolerance(1e-12).map_err(|e| e.to_string())?;
        let result = Executor::new(problem.renewed(false), solver)
            .configure(|s| s.max_iters(20_000))
            .run()
            .map_err(|e| e.to_string())?;
        let state = result.state();
        runs += 1;
        iterations += state.get_iter();
        tracing::debug!(run = runs, iterations = state.get_iter(), cost = state.get_best_cost(), "Nelder-Mead run");
        let cost = state.get_best_cost();
        let param = state.get_best_param().cloned().ok_or("the optimiser found no parameters")?;
        let improved = best_cost - cost > 1e-12 * best_cost.abs().max(1.0);
        best = param;
        best_cost = cost;
        if !improved {
            break;
        }
    }
    tracing::debug!(runs, iterations, "maximised the likelihood (Nelder-Mead)");
    Ok((best, best_cost))
}

/// Fits BG/NBD to every customer.
pub fn fit_bgnbd(customers: &[Customer]) -> Result<BgNbd, String> {
    let (p, ll) = maximise(customers, &BGNBD, &[1.0, 1.0, 1.0, 1.0])?;
    Ok(BgNbd { r: p[0], alpha: p[1], a: p[2], b: p[3], log_likelihood: ll })
}

/// Fits Gamma-Gamma to the customers with repeat purchases and a positive mean value.
pub fn fit_gamma_gamma(customers: &[Customer]) -> Result<GammaGamma, String> {
    let repeat: Vec<Customer> = customers.iter().copied().filter(|c| c.x > 0.0 && c.m > 0.0).collect();
    let (p, ll) = maximise(&repeat, &GAMMA_GAMMA, &[1.0, 1.0, 1.0])?;
    Ok(GammaGamma { p: p[0], q: p[1], v: p[2], log_likelihood: ll })
}

/// Gauss's hypergeometric function ₂F₁(a, b; c; z) for 0 ≤ z < 1, by its power series.
pub fn hyp2f1(a: f64, b: f64, c: f64, z: f64) -> f64 {
    let (mut term, mut sum) = (1.0, 1.0);
    for n in 0..1_000_000 {
        let n = n as f64;
        term *= (a + n) * (b + n) / ((c + n) * (n + 1.0)) * z;
        sum += term;
        if term.abs() <= 1e-15 * sum.abs() {
            break;
        }
    }
    sum
}

impl BgNbd {
    /// Probability that the customer is still active at the end of observation.
    pub fn p_alive(&self, c: &Customer) -> f64 {
        if c.x == 0.0 {
            return 1.0;
        }
        let log_div = (self.r + c.x) * ((self.alpha + c.t) / (self.alpha + c.t_x)).ln() + (self.a / (self.b + c.x - 1.0)).ln();
        1.0 / (1.0 + log_div.exp())
    }

    /// Expected purchases in the next `horizon` time units.
    pub fn expected_purchases(&self, horizon: f64, c: &Customer) -> f64 {
        self.expected_purchases_given(horizon, c, self.ln_hyp(horizon, c.x, c.t))
    }

    /// The logarithm of the hypergeometric term of [`BgNbd::expected_purchases`]: the costly
    /// part (a series), and a function of the horizon, `x` and `t` alone.
    fn ln_hyp(&self, horizon: f64, x: f64, t: f64) -> f64 {
        let (ha, hb, hc) = (self.r + x, self.b + x, self.a + self.b + x - 1.0);
        let z = horizon / (self.alpha + t + horizon);
        // The series converges slowly near z = 1; Euler's transformation gives the same value.
        let ln_hyp = hyp2f1(ha, hb, hc, z).ln();
        if ln_hyp.is_finite() { ln_hyp } else { hyp2f1(hc - ha, hc - hb, hc, z).ln() + (hc - ha - hb) * (1.0 - z).ln() }
    }

    /// [`BgNbd::expected_purchases`] given its [`BgNbd::ln_hyp`].
    fn expected_purchases_given(&self, horizon: f64, c: &Customer, ln_hyp: f64) -> f64 {
        let (r, alpha, a, b) = (self.r, self.alpha, self.a, self.b);
        let x = c.x;
        let first = (a + b + x - 1.0) / (a - 1.0);
        let second = 1.0 - (ln_hyp + (r + x) * ((alpha + c.t) / (alpha + c.t + horizon)).ln()).exp();
        let denominator = 1.0 + if x > 0.0 { (a / (b + x - 1.0)) * ((alpha + c.t) / (alpha + c.t_x)).powf(r + x) } else { 0.0 };
        first * second / denominator
    }
}

/// How lifetime value is measured: the `lifetime_value:` section of crmcube.yaml (every key
/// optional; a change refits the models at the next load).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The unit of recency, age and the BG/NBD purchase rate.
    pub time_unit: TimeUnit,
    /// How far ahead expected purchases and the lifetime value look, in months.
    pub horizon_months: u32,
    /// Discount rate per month applied to future value (0.01 = 1 % a month).
    pub monthly_discount: f64,
    /// The end of observation: purchases after it are ignored. Default: the last order date.
    pub observation_end: Option<chrono::NaiveDate>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { time_unit: TimeUnit::Week, horizon_months: 12, monthly_discount: 0.01, observation_end: None }
    }
}

/// The unit times are measured in. A month is 365.25 / 12 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    Day,
    Week,
    Month,
}

impl TimeUnit {
    pub fn days(self) -> f64 {
        match self {
            TimeUnit::Day => 1.0,
            TimeUnit::Week => 7.0,
            TimeUnit::Month => 365.25 / 12.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TimeUnit::Day => "day",
            TimeUnit::Week => "week",
            TimeUnit::Month => "month",
        }
    }
}

impl Settings {
    /// One month in the time unit.
    pub fn month(&self) -> f64 {
        TimeUnit::Month.days() / self.time_unit.days()
    }

    /// The horizon in the time unit.
    pub fn horizon(&self) -> f64 {
        self.horizon_months as f64 * self.month()
    }

    /// What is wrong with these settings, if anything: (key, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.horizon_months == 0 || self.horizon_months > 1200 {
            out.push(("horizon_months", format!("must be 1 to 1200 months, not {}", self.horizon_months)));
        }
        if !(0.0..1.0).contains(&self.monthly_discount) {
            out.push(("monthly_discount", format!("must be a rate from 0 up to 1 (0.01 = 1 % a month), not {}", self.monthly_discount)));
        }
        out
    }
}

/// Discounted lifetime value over the horizon: one step per month; each step's expected
/// purchases × the expected average value, discounted per month (the scheme of
/// `lifetimes.customer_lifetime_value`). In the currency of revenue.
pub fn clv(bg: &BgNbd, gg: &GammaGamma, c: &Customer, settings: &Settings) -> f64 {
    let ln_hyps: Vec<f64> = (1..=settings.horizon_months).map(|i| bg.ln_hyp(settings.month() * i as f64, c.x, c.t)).collect();
    clv_given(bg, gg, c, settings, &ln_hyps)
}

/// [`clv`] given the [`BgNbd::ln_hyp`] of each month's horizon.
fn clv_given(bg: &BgNbd, gg: &GammaGamma, c: &Customer, settings: &Settings, ln_hyps: &[f64]) -> f64 {
    let value = gg.expected_average_value(c);
    let step = settings.month();
    let mut before = 0.0;
    let mut total = 0.0;
    for (i, ln_hyp) in (1..=settings.horizon_months as i32).zip(ln_hyps) {
        let now = bg.expected_purchases_given(step * i as f64, c, *ln_hyp);
        total += (now - before) * value / (1.0 + settings.monthly_discount).powi(i);
        before = now;
    }
    total
}

/// A customer's predictions: [`BgNbd::p_alive`], [`BgNbd::expected_purchases`] over the
/// horizon, [`GammaGamma::expected_average_value`] and [`clv`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub p_alive: f64,
    pub expected_purchases: f64,
    pub expected_average_value: f64,
    pub clv: f64,
}

/// Every customer's [`Prediction`], the same floats as each function gives on its own. The
/// series of [`BgNbd::ln_hyp`] (one per month of the horizon) depend on a customer's `x` and `t`
/// alone, which many customers share (whole days in a few years, a few dozen repeat purchases):
/// they are summed once per distinct pair, in parallel. At 376 k customers that is about 20 times
/// fewer series.
pub fn predict(bg: &BgNbd, gg: &GammaGamma, customers: &[Customer], settings: &Settings) -> Vec<Prediction> {
    use rayon::prelude::*;
    use std::collections::HashMap;
    let mut pairs: HashMap<(u64, u64), usize> = HashMap::new();
    let mut distinct = Vec::new();
    let index: Vec<usize> = customers
        .iter()
        .map(|c| {
            *pairs.entry((c.x.to_bits(), c.t.to_bits())).or_insert_with(|| {
                distinct.push((c.x, c.t));
                distinct.len() - 1
            })
        })
        .collect();
    let months = settings.horizon_months as usize;
    let ln_hyps: Vec<f64> = distinct.par_iter().flat_map_iter(|&(x, t)| (1..=months).map(move |i| bg.ln_hyp(settings.month() * i as f64, x, t))).collect();
    // The horizon is the last month's (`horizon()` is the same product).
    customers
        .par_iter()
        .zip(index)
        .map(|(c, i)| {
            let ln_hyps = &ln_hyps[i * months..(i + 1) * months];
            let horizon = ln_hyps.last().copied().unwrap_or_else(|| bg.ln_hyp(settings.horizon(), c.x, c.t));
            Prediction {
                p_alive: bg.p_alive(c),
                expected_purchases: bg.expected_purchases_given(settings.horizon(), c, horizon),
                expected_average_value: gg.expected_average_value(c),
                clv: clv_given(bg, gg, c, settings, ln_hyps),
            }
        })
        .collect()
}

impl GammaGamma {
    /// Expected mean value of the customer's future purchases.
    pub fn expected_average_value(&self, c: &Customer) -> f64 {
        let population = self.v * self.p / (self.q - 1.0);
        if c.x == 0.0 {
            return population;
        }
        let w = self.p * c.x / (self.p * c.x + self.q - 1.0);
        (1.0 - w) * population + w * c.m
    }
}

/// `n` customers drawn from the BG/NBD story with parameters (r, α, a, b), each observed for `t`
/// time units from their first purchase: purchase rates from Gamma(r, α), dropout probabilities
/// from Beta(a, b); after each repeat purchase the customer drops out with their probability.
/// For tests and the fit benchmark (`cargo bench --bench clv`).
pub fn simulate(n: usize, r: f64, alpha: f64, a: f64, b: f64, t: f64, seed: u64) -> Vec<Customer> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let lambda = gamma_draw(&mut rng, r, alpha);
            let (ga, gb) = (gamma_draw(&mut rng, a, 1.0), gamma_draw(&mut rng, b, 1.0));
            let p = ga / (ga + gb);
            let (mut now, mut x, mut t_x) = (0.0, 0.0, 0.0);
            loop {
                now += -(1.0 - rng.random::<f64>()).ln() / lambda;
                if now > t {
                    break;
                }
                x += 1.0;
                t_x = now;
                if rng.random::<f64>() < p {
                    break;
                }
            }
            Customer { x, t_x, t, m: 0.0 }
        })
        .collect()
}

/// Gives simulated customers spend from the Gamma-Gamma story with parameters (p, q, v): each
/// customer's spend rate ν ~ Gamma(q, v), each purchase's value ~ Gamma(p, ν); `m` becomes the
/// mean of the customer's `x` repeat purchase values (0 without repeats). For the fit benchmark.
pub fn simulate_spend(customers: &mut [Customer], p: f64, q: f64, v: f64, seed: u64) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for c in customers.iter_mut() {
        let nu = gamma_draw(&mut rng, q, v);
        let n = c.x as usize;
        c.m = if n == 0 { 0.0 } else { (0..n).map(|_| gamma_draw(&mut rng, p, nu)).sum::<f64>() / n as f64 };
    }
}

/// A Gamma(shape, rate) draw: Marsaglia & Tsang's method; shapes below 1 via Gamma(shape + 1) ×
/// U^(1/shape).
fn gamma_draw(rng: &mut rand_chacha::ChaCha8Rng, shape: f64, rate: f64) -> f64 {
    use rand::Rng;
    let boost = if shape < 1.0 { rng.random::<f64>().powf(1.0 / shape) } else { 1.0 };
    let d = if shape < 1.0 { shape + 1.0 } else { shape } - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let (u1, u2): (f64, f64) = (rng.random(), rng.random());
        let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (1.0 + c * z).powi(3);
        if v > 0.0 && (1.0 - rng.random::<f64>()).ln() < 0.5 * z * z + d - d * v + d * v.ln() {
            return boost * d * v / rate;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypergeometric_series_matches_closed_forms() {
        // ₂F₁(1, 1; 2; z) = −ln(1 − z) / z; ₂F₁(a, b; b; z) = (1 − z)^(−a).
        for z in [0.1, 0.5, 0.9] {
            assert!((hyp2f1(1.0, 1.0, 2.0, z) - (-(1.0f64 - z).ln() / z)).abs() < 1e-10);
            assert!((hyp2f1(2.5, 3.0, 3.0, z) - (1.0f64 - z).powf(-2.5)).abs() < 1e-8);
        }
    }

    #[test]
    fn predictions_shared_by_x_and_t_are_each_customers_own() {
        // Ages of whole days in weeks, as a load measures them: many customers share (x, t).
        let mut customers = Vec::new();
        for (i, days) in [30.0, 200.0, 200.0, 731.0].into_iter().enumerate() {
            customers.extend(simulate(500, 0.8, 5.0, 0.9, 3.0, days / 7.0, i as u64));
        }
        simulate_spend(&mut customers, 6.0, 4.0, 15.0, 9);
        let bg = BgNbd { r: 0.8, alpha: 5.0, a: 0.9, b: 3.0, log_likelihood: 0.0 };
        let gg = GammaGamma { p: 6.0, q: 4.0, v: 15.0, log_likelihood: 0.0 };
        let settings = Settings::default();
        let predicted = predict(&bg, &gg, &customers, &settings);
        assert_eq!(predicted.len(), customers.len());
        for (c, p) in customers.iter().zip(&predicted) {
            // Each customer on its own: the discounted monthly increments of expected purchases.
            let value = gg.expected_average_value(c);
            let (mut before, mut total) = (0.0, 0.0);
            for i in 1..=settings.horizon_months as i32 {
                let now = bg.expected_purchases(settings.month() * i as f64, c);
                total += (now - before) * value / (1.0 + settings.monthly_discount).powi(i);
                before = now;
            }
            let own = Prediction { p_alive: bg.p_alive(c), expected_purchases: bg.expected_purchases(settings.horizon(), c), expected_average_value: value, clv: total };
            assert_eq!(*p, own, "{c:?}");
            assert!(total > 0.0 && total.is_finite(), "{c:?}");
        }
    }

    #[test]
    fn the_gamma_gamma_fit_recovers_the_parameters_that_generated_a_sample() {
        let (p, q, v) = (6.0, 4.0, 15.0);
        let mut customers = simulate(6000, 0.8, 5.0, 0.9, 3.0, 104.0, 3);
        simulate_spend(&mut customers, p, q, v, 4);
        let fit = fit_gamma_gamma(&customers).unwrap();
        // The population mean spend v·p/(q − 1) is what CLV uses; it is well identified.
        let (mean, fitted_mean) = (v * p / (q - 1.0), fit.v * fit.p / (fit.q - 1.0));
        assert!((fitted_mean - mean).abs() / mean < 0.1, "{fit:?}");
        for (got, want) in [(fit.p, p), (fit.q, q), (fit.v, v)] {
            assert!((got - want).abs() / want < 0.35, "{fit:?}");
        }
    }

    /// The tabulated terms give every customer's log-likelihood bit for bit as computing them for
    /// that customer alone, and that is the textbook formula (checked at a few points by hand).
    #[test]
    fn tabulated_likelihood_terms_give_the_same_floats_as_the_formula() {
        let mut customers = simulate(3000, 0.8, 5.0, 0.9, 3.0, 52.0, 11);
        simulate_spend(&mut customers, 6.0, 4.0, 15.0, 12);
        let max = tabulable(&customers).unwrap();
        for (f, params) in [(&BGNBD, vec![0.7, 4.0, 1.1, 2.5]), (&GAMMA_GAMMA, vec![5.0, 3.5, 12.0])] {
            let table: Vec<[f64; 3]> = (0..=max).map(|x| (f.terms)(&params, x as f64)).collect();
            let (ages, age_of) = distinct(&customers, |c| c.t);
            let (recencies, recency_of) = distinct(&customers, |c| c.t_x);
            for (i, c) in customers.iter().enumerate().filter(|(_, c)| c.x > 0.0 || params.len() == 4) {
                let logs = if f.logs { [(params[1] + ages[age_of[i] as usize]).ln(), (params[1] + recencies[recency_of[i] as usize]).ln()] } else { [c.m.ln(), 0.0] };
                let tabulated = (f.ll)(&params, &table[c.x as usize], c, logs);
                assert_eq!(tabulated.to_bits(), direct_ll(f, &params, c).to_bits(), "{c:?}");
            }
        }
        // BG/NBD by hand (Fader, Hardie & Lee 2005, eq. 6) for x = 2, t_x = 10, T = 30.
        let (r, alpha, a, b) = (0.7f64, 4.0f64, 1.1f64, 2.5f64);
        let c = Customer { x: 2.0, t_x: 10.0, t: 30.0, m: 0.0 };
        let g = |v: f64| libm::tgamma(v);
        let common = g(r + 2.0) * alpha.powf(r) / g(r) * g(a + b) * g(b + 2.0) / (g(b) * g(a + b + 2.0));
        let by_hand = (common * ((alpha + 30.0).powf(-(r + 2.0)) + a / (b + 1.0) * (alpha + 10.0).powf(-(r + 2.0)))).ln();
        assert!((direct_ll(&BGNBD, &[r, alpha, a, b], &c) - by_hand).abs() < 1e-12);
        // Gamma-Gamma by hand (Fader & Hardie 2013, eq. 5) for x = 3, m = 20.
        let (p, q, v) = (5.0f64, 3.5f64, 12.0f64);
        let c = Customer { x: 3.0, t_x: 0.0, t: 0.0, m: 20.0 };
        let by_hand = (g(p * 3.0 + q) / (g(p * 3.0) * g(q)) * v.powf(q) * 20.0f64.powf(p * 3.0 - 1.0) * 3.0f64.powf(p * 3.0) / (v + 60.0).powf(p * 3.0 + q)).ln();
        assert!((direct_ll(&GAMMA_GAMMA, &[p, q, v], &c) - by_hand).abs() < 1e-9);
    }

    /// The analytic gradient (tabulated or per customer) against central differences of the
    /// cost, for both models at a few points away from the optimum.
    #[test]
    fn the_gradient_is_the_slope_of_the_likelihood() {
        let mut customers = simulate(3000, 0.8, 5.0, 0.9, 3.0, 52.0, 21);
        simulate_spend(&mut customers, 6.0, 4.0, 15.0, 22);
        let repeat: Vec<Customer> = customers.iter().copied().filter(|c| c.x > 0.0 && c.m > 0.0).collect();
        let cases: [(&Likelihood, &[Customer], Vec<f64>); 4] = [
            (&BGNBD, &customers, vec![0.7, 4.0, 1.1, 2.5]),
            (&BGNBD, &customers, vec![2.0, 0.5, 0.3, 6.0]),
            (&GAMMA_GAMMA, &repeat, vec![5.0, 3.5, 12.0]),
            (&GAMMA_GAMMA, &repeat, vec![1.5, 8.0, 2.0]),
        ];
        for (f, customers, params) in cases {
            let log_params: Vec<f64> = params.iter().map(|p| p.ln()).collect();
            // Tabulated: the terms by x and the ages (one here), the recencies per customer.
            for tabulated in [true, false] {
                let problem = Problem::new(customers, f, tabulated);
                let (_, gradient) = problem.evaluate(&log_params, true);
                for j in 0..params.len() {
                    let h = 1e-5;
                    let at = |d: f64| {
                        let mut p = log_params.clone();
                        p[j] += d;
                        problem.evaluate(&p, false).0
                    };
                    let slope = (at(h) - at(-h)) / (2.0 * h);
                    assert!((gradient[j] - slope).abs() < 1e-7 * slope.abs().max(1.0), "{params:?} tabulated {tabulated}, parameter {j}: {} vs {slope}", gradient[j]);
                }
            }
        }
    }

    /// L-BFGS and Nelder-Mead find the same optimum; L-BFGS's is at least as good.
    #[test]
    fn quasi_newton_and_nelder_mead_agree_on_the_optimum() {
        let mut customers = simulate(5000, 0.8, 5.0, 0.9, 3.0, 78.0, 31);
        simulate_spend(&mut customers, 6.0, 4.0, 15.0, 32);
        let repeat: Vec<Customer> = customers.iter().copied().filter(|c| c.x > 0.0 && c.m > 0.0).collect();
        // Log-parameters: all parameters 1, as the fits start.
        for (f, customers, start) in [(&BGNBD, &customers[..], vec![0.0; 4]), (&GAMMA_GAMMA, &repeat[..], vec![0.0; 3])] {
            let problem = Problem::new(customers, f, true);
            let (qn, qn_cost) = quasi_newton(&problem, start.clone()).unwrap();
            let (nm, nm_cost) = nelder_mead(&problem, start).unwrap();
            assert!(qn_cost <= nm_cost + 1e-12, "L-BFGS {qn_cost} vs Nelder-Mead {nm_cost}");
            for (a, b) in qn.iter().zip(&nm) {
                assert!((a - b).abs() < 1e-4, "log-parameters {qn:?} vs {nm:?}");
            }
        }
    }

    #[test]
    fn the_bgnbd_fit_recovers_the_parameters_that_generated_a_sample() {
        let (r, alpha, a, b) = (0.8, 5.0, 0.9, 3.0);
        let customers = simulate(4000, r, alpha, a, b, 52.0, 7);
        let fit = fit_bgnbd(&customers).unwrap();
        for (got, want) in [(fit.r, r), (fit.alpha, alpha), (fit.a, a), (fit.b, b)] {
            assert!((got - want).abs() / want < 0.25, "{fit:?}");
        }
    }
}
