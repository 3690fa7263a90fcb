//! `tally-aggregator`: for now, `tally-aggregator migrate [--config FILE]` applies the
//! ClickHouse schema in `schemas/clickhouse` (or `TALLY_SCHEMAS`).

use anyhow::Context;
use tally_core::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let mut path = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => path = Some(args.next().context("--config needs a file")?),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    match command.as_str() {
        "migrate" => {
            let config = Config::load(path.as_deref().map(std::path::Path::new))?;
            let dir = tally_aggregator::migrate::default_dir();
            let migrations = tally_aggregator::migrate::load(&dir)?;
            let applied = tally_aggregator::migrate::apply(&config.clickhouse, &migrations)
                .await
                .with_context(|| format!("applying migrations to {}", config.clickhouse.url))?;
            println!(
                "clickhouse {} database {}: {} migration(s) known, applied now: {:?}",
                config.clickhouse.url,
                config.clickhouse.database,
                migrations.len(),
                applied
            );
            Ok(())
        }
        _ => anyhow::bail!("usage: tally-aggregator migrate [--config FILE]"),
    }
}
