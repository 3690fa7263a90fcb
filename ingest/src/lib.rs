//! The collector: accepts usage events over HTTP and answers only once the broker holds
//! them. See [`kafka::EventSink`] for what "accepted" means.

pub mod error;
pub mod http;
pub mod kafka;
pub mod metrics;
mod server;

pub use error::{Error, Result, SinkError};
pub use http::App;
pub use kafka::{EventSink, KafkaSink, Published};
pub use server::{serve, Collector};
