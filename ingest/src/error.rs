//! Errors of the collector.

/// Why a request's events could not all be stored. Every variant is retryable by the
/// client: resending the same events is safe because downstream dedupes by event id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("broker unavailable")]
    BrokerDown,
    #[error("producer queue full")]
    QueueFull,
    #[error("broker did not acknowledge: {0}")]
    Delivery(String),
    #[error("collector is shutting down")]
    ShuttingDown,
}

impl SinkError {
    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BrokerDown => "broker_down",
            Self::QueueFull => "queue_full",
            Self::Delivery(_) => "delivery",
            Self::ShuttingDown => "shutting_down",
        }
    }

    /// All of these clear up on their own: the client should retry after `Retry-After`.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// Start-up failures of the collector.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
