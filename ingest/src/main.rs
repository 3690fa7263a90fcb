//! `tally-ingest`: the collector service.
//!
//! Usage: `tally-ingest [--config FILE]` (or `TALLY_CONFIG=FILE`); `TALLY_LOG` sets the
//! log filter, `TALLY_LOG_FORMAT=json` switches to JSON lines.

use anyhow::Context;
use tally_core::Config;

// Every event is parsed into a handful of short-lived buffers (its id, key and record) on a
// tokio worker and freed after the producer has copied them; glibc's allocator spent about
// a sixth of the collector's CPU on that churn (BENCHMARKS.md, collector results).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_service::init_logging();
    let mut args = std::env::args().skip(1);
    let mut path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => path = Some(args.next().context("--config needs a file")?),
            "-h" | "--help" => {
                println!("usage: tally-ingest [--config FILE]");
                return Ok(());
            }
            other => {
                anyhow::bail!("unknown argument {other:?}; usage: tally-ingest [--config FILE]")
            }
        }
    }
    let config = Config::load(path.as_deref().map(std::path::Path::new))?;
    let collector = tally_ingest::serve(config).await?;
    shutdown_signal().await;
    tracing::info!("signal received");
    collector.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
