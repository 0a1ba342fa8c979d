//! Logs to the app: a [`Logger`] the app implements receives the core's events.

use std::sync::{Arc, RwLock};

use credproxy::embed::LogSink;
use tracing::Level;

use crate::error::MobileError;

/// How much to log, from least to most.
#[derive(uniffi::Enum, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Failures.
    Error,
    /// Problems the proxy works around or reports to clients.
    Warn,
    /// One line per request, starts and stops.
    Info,
    /// Details for debugging.
    Debug,
    /// Everything.
    Trace,
}

/// Implemented by the app: receives log lines (from the proxy's threads, so it must be
/// thread-safe and quick). Lines never contain secrets.
#[uniffi::export(foreign)]
pub trait Logger: Send + Sync {
    /// One log line: its level, the module it came from, and the text.
    fn log(&self, level: LogLevel, target: String, message: String) -> Result<(), MobileError>;
}

/// The app's logger and the most verbose level it wants.
static LOGGER: RwLock<Option<(Arc<dyn Logger>, LogLevel)>> = RwLock::new(None);

/// Sends log lines up to `level` to `logger` (replacing any earlier one), or none when `None`.
#[uniffi::export]
pub fn set_logger(logger: Option<Arc<dyn Logger>>, level: LogLevel) {
    *LOGGER.write().unwrap_or_else(|e| e.into_inner()) = logger.map(|l| (l, level));
}

/// The sink that forwards to whatever logger is set when an event happens.
pub(crate) fn sink() -> Option<Arc<dyn LogSink>> {
    Some(Arc::new(AppLogger))
}

struct AppLogger;

impl LogSink for AppLogger {
    fn enabled(&self, level: Level) -> bool {
        current().is_some_and(|(_, max)| LogLevel::from(level) <= max)
    }

    fn log(&self, level: Level, target: &str, message: &str) {
        if let Some((logger, _)) = current() {
            // A logger that throws loses that line; the proxy carries on.
            let _ = logger.log(level.into(), target.to_owned(), message.to_owned());
        }
    }
}

fn current() -> Option<(Arc<dyn Logger>, LogLevel)> {
    LOGGER.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl From<Level> for LogLevel {
    fn from(level: Level) -> Self {
        match level {
            Level::ERROR => Self::Error,
            Level::WARN => Self::Warn,
            Level::INFO => Self::Info,
            Level::DEBUG => Self::Debug,
            _ => Self::Trace,
        }
    }
}
