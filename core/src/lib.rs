//! tally's shared core: the usage event, the meter catalog, configuration and validation.
//! Nothing here touches the network; every stage builds on it.

pub mod body;
pub mod catalog;
pub mod config;
pub mod data;
pub mod event;
pub mod quantity;
mod scan;
pub mod validate;

pub use body::{BodyError, BodyFormat};
pub use catalog::{Aggregation, Catalog, Meter};
pub use config::{Config, Tenant, Tenants};
pub use data::EventData;
pub use event::UsageRecord;
pub use quantity::Quantity;
pub use validate::{
    measure, Dialect, Encoded, Measurement, MeterValue, Refused, Rejection, Validator,
};
