//! The progress bar of a load or a sample on a terminal, driven by their own log events.
//!
//! `etl::load` knows nothing of terminals: it emits tracing events (`cleaned`, `derived`,
//! `written`, with a `table` field), as the sample generator does (`generated`, with a `month`
//! field). [`ProgressLayer`] turns them into steps of an indicatif bar
//! while one is [`start`]ed; with `CRMCUBE_LOG` set, or when stderr is not a terminal (cron,
//! systemd), there is no bar and the events are plain log lines instead.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Shows a bar of `steps` steps, with `message` until the first step, until [`finish`].
pub fn start(steps: u64, message: &'static str) {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
}

/// Removes the bar (the command prints its own summary).
pub fn finish() {
    if let Some(bar) = BAR.lock().unwrap_or_else(|e| e.into_inner()).take() {
        bar.finish_and_clear();
    }
}

/// Whether a bar suits this run: a terminal on stderr and no log lines asked for.
pub fn wanted() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("CRMCUBE_LOG").is_none()
}

/// Advances the bar on the loader's per-table events.
pub struct ProgressLayer;

#[derive(Default)]
struct Fields {
    message: String,
    table: String,
    month: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "table" => self.table = format!("{value:?}"),
            "month" => self.month = format!("{value:?}"),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "table" => self.table = value.to_string(),
            "month" => self.month = value.to_string(),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ProgressLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let guard = BAR.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bar) = guard.as_ref() else { return };
        let mut f = Fields::default();
        event.record(&mut f);
        let (verb, steps) = match f.message.as_str() {
            // `crmcube sample`: one step a month of activity.
            "generated" => {
                bar.inc(1);
                bar.set_message(format!("generated {}", f.month));
                return;
            }
            "cleaned" => ("cleaned", 1),
            "derived" => ("derived", 1),
            "written" => ("wrote", 1),
            // A kept table is neither built nor written.
            "unchanged" => ("kept", 2),
            _ => return,
        };
        bar.inc(steps);
        bar.set_message(format!("{verb} {}", f.table));
    }
}
