//! `tally-rater`: subscriptions from the command line.
//!
//! ```text
//! tally-rater [--config FILE] [--plans DIR] [--json] COMMAND [FLAGS]
//!   migrate   [--schemas DIR]
//!   subscribe --tenant T --customer C --plan P [--version N] --start TIME [--anchor TIME]
//!   change    --tenant T --customer C --plan P [--version N] --at TIME [--migration ID]
//!   cancel    --tenant T --customer C --at TIME
//!   list      --tenant T [--at TIME]
//!   history   --tenant T --customer C
//!   migrate-plan --tenant T --plan P --to-version N --id ID [--from-versions 1,2]
//!             [--customers a,b] [--effective next-period|TIME] [--preview]
//!   price     --plan PLAN_FILE --usage USAGE_JSON [--format json|csv]
//! ```
//!
//! subscribe, change and cancel also take `--actor A` (default `$USER`), `--reason R` and
//! `--change-id ID` (the idempotency key; default derived from the change, so running the
//! same command twice records it once). TIME is RFC 3339 in whole seconds. `--schemas`
//! defaults to `TALLY_SCHEMAS`, then the repository's `schemas/clickhouse`. `--config`
//! defaults to `TALLY_CONFIG`, then `config/tally.dev.toml`; `TALLY_CLICKHOUSE_URL` and
//! `TALLY_CLICKHOUSE_DATABASE` override the file. `--plans` defaults to `config/plans`.
//! Output is a table, or JSON lines with `--json`. Exit status: 0 done (or already done),
//! 1 refused or failed, 2 bad arguments.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;
use tally_core::Config;
use tally_rater::quote::{quote, PriceRequest};
use tally_rater::run::{billables, closed_billables, Billable, InvoiceRun};
use tally_rater::store::{Recorded, SubscriptionStore};
use tally_rater::subscription::{Change, ChangeKind, NewChange, Status};
use tally_rater::usage::UsageReader;
use tally_rater::{
    Catalog, Effective, Invoice, MigrationPreview, MigrationSpec, Notifier, PlanVersion,
    RunOptions, RunResult,
};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

// Pricing allocates and frees many small strings and vectors per batch; with glibc's
// allocator a batch's freed heap goes back to the kernel and is faulted in again for the
// next (measured on the pricing bench: 1.6x the time, and erratic).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: tally-rater [--config FILE] [--plans DIR] [--json] COMMAND [FLAGS]
  serve     invoice previews over HTTP, /healthz, /readyz, /metrics (rater.listen)
  migrate   [--schemas DIR]
  subscribe --tenant T --customer C --plan P [--version N] --start TIME [--anchor TIME]
  change    --tenant T --customer C --plan P [--version N] --at TIME [--migration ID]
  cancel    --tenant T --customer C --at TIME
  list      --tenant T [--at TIME]
  history   --tenant T --customer C
  migrate-plan --tenant T --plan P --to-version N --id ID [--from-versions 1,2]
            [--customers a,b] [--effective next-period|TIME] [--preview] [--actor A] [--reason R]
  invoice   --tenant T [--at TIME] [--mode preview|final] [--grace-hours H] [--format json|csv]
            [--batch N]
  price     --plan PLAN_FILE --usage USAGE_JSON [--format json|csv]
subscribe, change and cancel also take [--actor A] [--reason R] [--change-id ID].
invoice prices each subscribed customer's period that contains --at (default now):
preview stores nothing; final needs the period closed --grace-hours ago (default 24),
stores each invoice once, and prints what is stored. Without --at, final takes each
customer's latest period closed that long ago (what `serve` runs every
rater.final_every_secs, with rater.final_catch_up_periods periods before it).
migrate-plan moves a plan's subscribers to version N (default: from every older version),
each at its next billing period (default) or all at TIME; --preview writes nothing. Running
it again with the same --id resumes it, or says it is done.
price is pure (no store, no config): it prints the invoice that the plan file gives for the
quantities in USAGE_JSON (inline JSON, a file, or - for standard input): {\"tokens\": 1500},
or {\"usage\": {…}, \"period_start\", \"anchor\", \"subscription_start\",
\"subscription_end\", \"at\", \"customer\"} when proration matters (README, \"Pricing\").
TIME is RFC 3339 in whole seconds, like 2025-01-01T00:00:00Z.";

/// Flags each command takes; `*` marks the required ones.
const COMMANDS: &[(&str, &[&str])] = &[
    ("serve", &[]),
    ("migrate", &["schemas"]),
    (
        "subscribe",
        &[
            "tenant*",
            "customer*",
            "plan*",
            "version",
            "start*",
            "anchor",
            "actor",
            "reason",
            "change-id",
        ],
    ),
    (
        "change",
        &[
            "tenant*",
            "customer*",
            "plan*",
            "version",
            "at*",
            "migration",
            "actor",
            "reason",
            "change-id",
        ],
    ),
    (
        "cancel",
        &[
            "tenant*",
            "customer*",
            "at*",
            "actor",
            "reason",
            "change-id",
        ],
    ),
    ("list", &["tenant*", "at"]),
    ("history", &["tenant*", "customer*"]),
    (
        "migrate-plan",
        &[
            "tenant*",
            "plan*",
            "to-version*",
            "id*",
            "from-versions",
            "customers",
            "effective",
            "preview",
            "actor",
            "reason",
        ],
    ),
    (
        "invoice",
        &["tenant*", "at", "mode", "grace-hours", "format", "batch"],
    ),
    ("price", &["plan*", "usage*", "format"]),
];

/// Flags any command takes.
const GLOBAL: &[&str] = &["config", "plans"];

/// A mistake in the command line: exit status 2, with the usage.
#[derive(Debug)]
struct ArgError(String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgError {}

fn arg_error(message: String) -> anyhow::Error {
    ArgError(message).into()
}

#[derive(Debug)]
struct Args {
    command: &'static str,
    json: bool,
    flags: BTreeMap<&'static str, String>,
}

impl Args {
    fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Args> {
        let mut args = args.into_iter();
        let mut command: Option<(&'static str, &'static [&'static str])> = None;
        let mut json = false;
        let mut given: Vec<(String, String)> = Vec::new();
        while let Some(arg) = args.next() {
            if matches!(arg.as_str(), "--help" | "-h" | "help") {
                return Ok(Args {
                    command: "help",
                    json,
                    flags: BTreeMap::new(),
                });
            } else if arg == "--json" {
                json = true;
            } else if arg == "--preview" {
                // A switch, like --json; only migrate-plan takes it.
                given.push(("preview".to_owned(), "true".to_owned()));
            } else if let Some(flag) = arg.strip_prefix("--") {
                let (name, value) = match flag.split_once('=') {
                    Some((name, value)) => (name.to_owned(), value.to_owned()),
                    None => {
                        let value = args
                            .next()
                            .ok_or_else(|| arg_error(format!("--{flag} needs a value")))?;
                        (flag.to_owned(), value)
                    }
                };
                given.push((name, value));
            } else if command.is_none() {
                command = Some(
                    COMMANDS
                        .iter()
                        .find(|(name, _)| *name == arg)
                        .copied()
                        .ok_or_else(|| arg_error(format!("unknown command {arg:?}")))?,
                );
            } else {
                return Err(arg_error(format!("unexpected argument {arg:?}")));
            }
        }
        let (command, known) = command.ok_or_else(|| arg_error("no command given".into()))?;
        let mut flags = BTreeMap::new();
        for (name, value) in given {
            let Some(spec) = known
                .iter()
                .chain(GLOBAL)
                .find(|s| s.trim_end_matches('*') == name)
            else {
                return Err(arg_error(format!("{command} takes no flag --{name}")));
            };
            if flags.insert(spec.trim_end_matches('*'), value).is_some() {
                return Err(arg_error(format!("--{name} given twice")));
            }
        }
        for spec in known.iter().filter_map(|s| s.strip_suffix('*')) {
            if !flags.contains_key(spec) {
                return Err(arg_error(format!("{command} needs --{spec}")));
            }
        }
        Ok(Args {
            command,
            json,
            flags,
        })
    }

    fn get(&self, flag: &str) -> Option<&str> {
        self.flags.get(flag).map(String::as_str)
    }

    /// A required flag (checked present by `parse`).
    fn required(&self, flag: &str) -> anyhow::Result<&str> {
        self.get(flag)
            .ok_or_else(|| arg_error(format!("{} needs --{flag}", self.command)))
    }

    fn time(&self, flag: &str) -> anyhow::Result<Option<OffsetDateTime>> {
        let Some(text) = self.get(flag) else {
            return Ok(None);
        };
        let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
            arg_error(format!(
                "--{flag}: {text:?} is not an RFC 3339 time (like 2025-01-01T00:00:00Z)"
            ))
        })?;
        if t.nanosecond() != 0 {
            return Err(arg_error(format!(
                "--{flag}: {text:?} has a fraction of a second; subscriptions change on whole seconds"
            )));
        }
        Ok(Some(t))
    }

    fn version(&self) -> anyhow::Result<Option<u32>> {
        self.get("version")
            .map(|v| {
                v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    arg_error(format!(
                        "--version: {v:?} is not a version number (1, 2, …)"
                    ))
                })
            })
            .transpose()
    }

    /// Who, why and which id, for the commands that record a change.
    fn audit(&self, mut change: NewChange) -> NewChange {
        change.actor = self
            .get("actor")
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".to_owned());
        change.reason = self.get("reason").unwrap_or_default().to_owned();
        change.change_id = self.get("change-id").map(str::to_owned);
        change
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse(std::env::args().skip(1))).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<ArgError>() => {
            eprintln!("tally-rater: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("tally-rater: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once (some messages already quote their cause).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

async fn run(args: anyhow::Result<Args>) -> anyhow::Result<()> {
    let args = args?;
    if args.command == "help" {
        println!("{USAGE}");
        return Ok(());
    }
    if args.command == "price" {
        return price(&args);
    }
    let config_path = match args.get("config") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("TALLY_CONFIG").is_some() => None,
        None => Some(PathBuf::from("config/tally.dev.toml")),
    };
    let config = Config::load(config_path.as_deref())?;
    let store = SubscriptionStore::new(&config.clickhouse);
    let plans = || -> anyhow::Result<Catalog> {
        let dir = Path::new(args.get("plans").unwrap_or("config/plans"));
        Catalog::load_dir(dir).with_context(|| format!("loading plans from {}", dir.display()))
    };
    let out = Output { json: args.json };
    match args.command {
        "serve" => serve(&config, plans()?).await?,
        "migrate" => {
            let dir = args
                .get("schemas")
                .map_or_else(tally_aggregator::migrate::default_dir, PathBuf::from);
            let migrations = tally_aggregator::migrate::load(&dir)?;
            let applied = tally_aggregator::migrate::apply(&config.clickhouse, &migrations)
                .await
                .with_context(|| format!("applying migrations to {}", config.clickhouse.url))?;
            if out.json {
                out.line(&serde_json::json!({
                    "database": config.clickhouse.database,
                    "applied": applied,
                }))?;
            } else {
                println!(
                    "clickhouse {} database {}: applied now: {applied:?}",
                    config.clickhouse.url, config.clickhouse.database
                );
            }
        }
        "subscribe" | "change" => {
            let (tenant, customer, plan) = (
                args.required("tenant")?,
                args.required("customer")?,
                args.required("plan")?,
            );
            let mut change = if args.command == "subscribe" {
                let start = args.time("start")?.context("subscribe needs --start")?;
                let mut c = NewChange::create(tenant, customer, plan, start);
                c.billing_anchor = args.time("anchor")?;
                c
            } else {
                let at = args.time("at")?.context("change needs --at")?;
                match args.get("migration") {
                    Some(m) => NewChange::migrate(tenant, customer, plan, at, m),
                    None => NewChange::change(tenant, customer, plan, at),
                }
            };
            change.version = args.version()?;
            let plans = published(&store, plans()?).await?;
            let recorded = store.record(&plans, args.audit(change)).await?;
            out.recorded(&recorded)?;
            notify(&config, recorded.change()).await;
        }
        "cancel" => {
            let at = args.time("at")?.context("cancel needs --at")?;
            let change =
                NewChange::cancel(args.required("tenant")?, args.required("customer")?, at);
            // A cancel names no plan: it needs no catalog.
            let recorded = store
                .record(&Catalog::default(), args.audit(change))
                .await?;
            out.recorded(&recorded)?;
            notify(&config, recorded.change()).await;
        }
        "list" => {
            let at = args.time("at")?.unwrap_or_else(OffsetDateTime::now_utc);
            let statuses = store.list(args.required("tenant")?, at).await?;
            out.list(&statuses)?;
        }
        "history" => {
            let customer = args.required("customer")?;
            let changes = store.history(args.required("tenant")?, customer).await?;
            out.history(customer, &changes)?;
        }
        "invoice" => invoice(&args, &config, &published(&store, plans()?).await?).await?,
        "migrate-plan" => {
            let plans = published(&store, plans()?).await?;
            migrate_plan(&args, &config, &store, &plans, &out).await?
        }
        other => unreachable!("command {other} is in COMMANDS"),
    }
    Ok(())
}

/// The catalog, once checked against the plan versions already published and with its new
/// versions recorded: a published version whose file changed is refused.
async fn published(store: &SubscriptionStore, catalog: Catalog) -> anyhow::Result<Catalog> {
    let new = store
        .publish_plans(&catalog, OffsetDateTime::now_utc())
        .await
        .context("checking the plans against the published versions")?;
    if new > 0 {
        tracing::info!(new, "plan versions published");
    }
    Ok(catalog)
}

/// `price`: one invoice from a plan file and quantities; reads no config and no store.
fn price(args: &Args) -> anyhow::Result<()> {
    let csv = match args.get("format").unwrap_or("json") {
        "json" => false,
        "csv" => true,
        other => return Err(arg_error(format!("--format: {other:?} is not json or csv"))),
    };
    let plan_file = Path::new(args.required("plan")?);
    let bytes = std::fs::read(plan_file)
        .with_context(|| format!("--plan: reading {}", plan_file.display()))?;
    let plan = PlanVersion::parse_standalone(plan_file, &bytes)?;
    let usage = args.required("usage")?;
    let text = if usage.trim_start().starts_with('{') {
        usage.to_owned()
    } else if usage == "-" {
        std::io::read_to_string(std::io::stdin()).context("--usage: reading standard input")?
    } else {
        std::fs::read_to_string(usage).with_context(|| format!("--usage: reading {usage}"))?
    };
    let request = PriceRequest::parse(&text).context("--usage")?;
    let invoice = quote(&plan, &request, OffsetDateTime::now_utc())?;
    let text = if csv {
        invoice.to_csv()
    } else {
        serde_json::to_string_pretty(&invoice)? + "\n"
    };
    // A reader that stops early (`| head`) is not an error of ours.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written.context("writing the invoice"),
    }
}

/// `invoice`: previews or final invoices for a tenant's customers, batch by batch.
async fn invoice(args: &Args, config: &Config, plans: &Catalog) -> anyhow::Result<()> {
    let tenant = args.required("tenant")?;
    let now = OffsetDateTime::now_utc();
    let given_at = args.time("at")?;
    let at = given_at.unwrap_or(now);
    let final_run = match args.get("mode").unwrap_or("preview") {
        "preview" => false,
        "final" => true,
        other => {
            return Err(arg_error(format!(
                "--mode: {other:?} is not preview or final"
            )))
        }
    };
    let csv = match args.get("format").unwrap_or("json") {
        "json" => false,
        "csv" => true,
        other => return Err(arg_error(format!("--format: {other:?} is not json or csv"))),
    };
    let number = |flag: &str, default: u64| -> anyhow::Result<u64> {
        args.get(flag).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| arg_error(format!("--{flag}: {v:?} is not a whole number")))
        })
    };
    let grace = time::Duration::hours(number("grace-hours", 24)? as i64);
    let batch_size = number("batch", 10_000)?.max(1) as usize;

    let store = SubscriptionStore::new(&config.clickhouse);
    let reader = UsageReader::new(
        &config.clickhouse,
        config.catalog(),
        config.validation.max_dimension_chars,
    );
    let mut run = InvoiceRun::new(&config.clickhouse, reader);
    if final_run {
        run = run.with_publisher(Notifier::new(&config.kafka, &config.rater.invoice_topic)?);
    }
    let mut header = true;
    let mut print = |inv: &Invoice| {
        if csv {
            let text = inv.to_csv();
            let body = if header {
                text.as_str()
            } else {
                text.split_once('\n').map_or("", |(_, rest)| rest)
            };
            print!("{body}");
            header = false;
        } else if let Ok(json) = serde_json::to_string(inv) {
            println!("{json}");
        }
    };
    let (mut written, mut already, mut published, mut lines) = (0, 0, 0, 0);
    let mut refused;
    if final_run {
        // Without --at, each customer's latest closed period.
        let batches;
        (batches, refused) = match given_at {
            None => closed_billables(&store, plans, tenant, now, grace, batch_size).await?,
            Some(_) => billables(&store, plans, tenant, at, batch_size).await?,
        };
        let mut closed_batches = Vec::with_capacity(batches.len());
        for batch in batches {
            let (closed, open): (Vec<Billable>, Vec<Billable>) = batch
                .into_iter()
                .partition(|b| b.period.end() + grace <= now);
            refused.extend(open.into_iter().map(|b| {
                let ready = b.period.end() + grace;
                (
                    b.customer,
                    format!("period not closed until {}", time_text(ready)),
                )
            }));
            if !closed.is_empty() {
                closed_batches.push(closed);
            }
        }
        run.finalize_all(plans, tenant, &closed_batches, |done| {
            written += done.written;
            already += done.already_final;
            published += done.published;
            lines += done.published_lines;
            refused.extend(done.refused);
            done.invoices.iter().for_each(&mut print);
        })
        .await?;
    } else {
        let mut unpriced = Vec::new();
        refused = run
            .preview_all(&store, plans, tenant, at, batch_size, |priced| {
                unpriced.extend(priced.refused);
                priced.invoices.iter().for_each(&mut print);
            })
            .await?;
        refused.extend(unpriced);
    }
    for (customer, reason) in &refused {
        eprintln!("tally-rater: customer {customer:?} not invoiced: {reason}");
    }
    if final_run {
        eprintln!(
            "tally-rater: final run: {written} invoices written, {already} already final; \
             {published} invoices ({lines} lines) published to {}",
            config.rater.invoice_topic
        );
    }
    Ok(())
}

/// `serve`: the preview API until SIGTERM or Ctrl-C, then in-flight requests finish.
async fn serve(config: &Config, plans: Catalog) -> anyhow::Result<()> {
    tally_service::init_logging();
    let migrations = tally_aggregator::migrate::load(&tally_aggregator::migrate::default_dir())?;
    let mut backoff = std::time::Duration::from_millis(200);
    while let Err(e) = tally_aggregator::migrate::apply(&config.clickhouse, &migrations).await {
        anyhow::ensure!(e.is_retryable(), "applying migrations: {e}");
        tracing::warn!(error = %e, "cannot apply migrations yet; waiting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
    let plans =
        std::sync::Arc::new(published(&SubscriptionStore::new(&config.clickhouse), plans).await?);
    let schedule = tally_rater::schedule::Schedule::from_config(config, plans.clone())?;
    let api = std::sync::Arc::new(tally_rater::http::Api::new(config, (*plans).clone()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (addr, server) = tally_rater::http::serve(&config.rater.listen, api, stop.clone())
        .await
        .with_context(|| format!("listening on {}", config.rater.listen))?;
    tracing::info!(%addr, "rater API listening");
    let finals = schedule.map(|s| tokio::spawn(s.run(stop)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received: finishing in-flight previews");
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(finals) = finals {
        let _ = finals.await;
    }
    tracing::info!("rater API stopped");
    Ok(())
}

/// `migrate-plan`: the spec from the flags.
fn migration_spec(args: &Args) -> anyhow::Result<MigrationSpec> {
    let number = |flag: &str, v: &str| -> anyhow::Result<u32> {
        v.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| arg_error(format!("--{flag}: {v:?} is not a version number (1, 2, …)")))
    };
    let mut spec = MigrationSpec::new(
        args.required("id")?,
        args.required("tenant")?,
        args.required("plan")?,
        number("to-version", args.required("to-version")?)?,
    );
    spec.from_versions = args
        .get("from-versions")
        .map(|list| {
            list.split(',')
                .map(|v| number("from-versions", v))
                .collect()
        })
        .transpose()?;
    spec.customers = args
        .get("customers")
        .map(|list| list.split(',').map(|c| c.trim().to_owned()).collect());
    if let Some(text) = args.get("effective") {
        spec.effective = Effective::parse(text).ok_or_else(|| {
            arg_error(format!(
                "--effective: {text:?} is not next-period or an RFC 3339 time"
            ))
        })?;
    }
    spec.actor = args
        .get("actor")
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".to_owned());
    spec.reason = args.get("reason").unwrap_or_default().to_owned();
    Ok(spec)
}

async fn migrate_plan(
    args: &Args,
    config: &Config,
    store: &SubscriptionStore,
    plans: &Catalog,
    out: &Output,
) -> anyhow::Result<()> {
    let spec = migration_spec(args)?;
    let started = std::time::Instant::now();
    let now = OffsetDateTime::now_utc();
    if args.get("preview").is_some() {
        let preview = store.preview_migration(plans, &spec, now).await?;
        if out.json {
            return out.line(&preview);
        }
        println!(
            "preview of migration {:?}: {} subscriptions of {} would move to v{} (judged at {})",
            spec.id,
            preview.total,
            spec.plan,
            spec.to_version,
            time(preview.as_of)
        );
        out.groups(&preview);
        return Ok(());
    }
    let notifier = Notifier::new(&config.kafka, &config.quota.entitlement_topic)?;
    let report = store
        .run_migration(plans, &spec, &notifier, RunOptions::default(), now)
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    if out.json {
        return out.line(&serde_json::json!({ "report": report, "seconds": seconds }));
    }
    let head = match report.result {
        RunResult::Done => "done",
        RunResult::AlreadyDone => "already done, nothing written or sent",
        RunResult::Interrupted => "interrupted; run it again to finish",
    };
    println!(
        "migration {:?}: {head}: {} subscriptions to {} v{}, {} changes written now, {} \
         earlier, {} notifications to {}, {seconds:.2} s",
        spec.id,
        report.preview.total,
        spec.plan,
        spec.to_version,
        report.written,
        report.already_written,
        report.published,
        config.quota.entitlement_topic
    );
    out.groups(&report.preview);
    Ok(())
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

struct Output {
    json: bool,
}

impl Output {
    fn line(&self, value: &impl Serialize) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string(value)?);
        Ok(())
    }

    fn recorded(&self, recorded: &Recorded) -> anyhow::Result<()> {
        let (result, c) = match recorded {
            Recorded::Written(c) => ("written", c),
            Recorded::AlreadyRecorded(c) => ("already_recorded", c),
        };
        if self.json {
            return self.line(&serde_json::json!({ "result": result, "change": c }));
        }
        let what = match c.kind {
            ChangeKind::Create => format!("subscription to {} v{}", c.plan, c.version),
            ChangeKind::Change => format!("change to {} v{}", c.plan, c.version),
            ChangeKind::Migrate => {
                format!("migration {} to {} v{}", c.migration_id, c.plan, c.version)
            }
            ChangeKind::Cancel => "cancel".to_owned(),
        };
        let head = match recorded {
            Recorded::Written(_) => "recorded",
            Recorded::AlreadyRecorded(_) => "already recorded, nothing written",
        };
        println!(
            "{head}: {what} for customer {:?} of tenant {:?} effective {} (anchor {}), change id {}",
            c.customer,
            c.tenant,
            time(c.effective_at),
            time(c.billing_anchor),
            c.change_id
        );
        Ok(())
    }

    fn list(&self, statuses: &[Status]) -> anyhow::Result<()> {
        if self.json {
            return statuses.iter().try_for_each(|s| self.line(s));
        }
        table(
            &["CUSTOMER", "STATE", "PLAN", "ANCHOR", "SINCE"],
            statuses.iter().map(|s| {
                vec![
                    s.customer.clone(),
                    s.state.to_string(),
                    format!("{} v{}", s.plan, s.version),
                    time(s.billing_anchor),
                    time(s.since),
                ]
            }),
        );
        Ok(())
    }

    fn groups(&self, preview: &MigrationPreview) {
        table(
            &[
                "FROM",
                "TO",
                "COUNT",
                "EFFECTIVE FROM",
                "EFFECTIVE TO",
                "CHANGES",
            ],
            preview.groups.iter().map(|g| {
                let opt = |t: Option<OffsetDateTime>| t.map_or_else(|| "-".to_owned(), time);
                vec![
                    format!("v{}", g.from_version),
                    format!("v{}", g.to_version),
                    g.count.to_string(),
                    opt(g.effective_min),
                    opt(g.effective_max),
                    format!(
                        "{} features, {} limits",
                        g.changes.features.len(),
                        g.changes.limits.len()
                    ),
                ]
            }),
        );
        for (reason, n) in &preview.skipped {
            println!("left as they are ({reason}): {n}");
        }
    }

    fn history(&self, customer: &str, changes: &[Change]) -> anyhow::Result<()> {
        if self.json {
            return changes.iter().try_for_each(|c| self.line(c));
        }
        if changes.is_empty() {
            println!("no subscription changes for customer {customer:?}");
            return Ok(());
        }
        table(
            &[
                "EFFECTIVE",
                "KIND",
                "PLAN",
                "ANCHOR",
                "RECORDED",
                "ACTOR",
                "REASON",
                "CHANGE ID",
            ],
            changes.iter().map(|c| {
                vec![
                    time(c.effective_at),
                    match c.migration_id.as_str() {
                        "" => c.kind.to_string(),
                        m => format!("{} ({m})", c.kind),
                    },
                    match c.kind {
                        ChangeKind::Cancel => "-".to_owned(),
                        _ => format!("{} v{}", c.plan, c.version),
                    },
                    time(c.billing_anchor),
                    time(c.recorded_at),
                    c.actor.clone(),
                    c.reason.clone(),
                    c.change_id.clone(),
                ]
            }),
        );
        Ok(())
    }
}

fn time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| format!("{t:?}"))
}

/// Left-aligned columns, two spaces apart; control characters shown as spaces.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .map(|r| {
            r.into_iter()
                .map(|c| c.replace(char::is_control, " "))
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (cell, w) in cells.zip(&widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w + 2 - cell.chars().count()));
        }
        println!("{}", line.trim_end());
    };
    print(&mut header.iter().copied());
    for row in &rows {
        print(&mut row.iter().map(String::as_str));
    }
}

/// Tells caches (the quota service) that the customer's entitlements may have changed. The
/// change is already durable; a failed notice is reported, not fatal: caches also expire.
/// An already-recorded change is notified again, so a rerun repairs a lost notice.
async fn notify(config: &Config, change: &Change) {
    let sent = async {
        Notifier::new(&config.kafka, &config.quota.entitlement_topic)?
            .publish_changes(&[change])
            .await
    };
    if let Err(e) = sent.await {
        eprintln!(
            "warning: change recorded, but the entitlement-change notice was not published ({e}); \
             caches pick it up within quota.cache_ttl_ms"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> anyhow::Result<Args> {
        Args::parse(line.split_whitespace().map(str::to_owned))
    }

    fn refusal(line: &str) -> String {
        let e = parse(line).expect_err("refused");
        assert!(e.is::<ArgError>(), "{e}");
        e.to_string()
    }

    #[test]
    fn flags_go_anywhere_and_take_values() {
        let a = parse(
            "--json subscribe --tenant t --customer=c --plan pro --start 2025-01-01T00:00:00Z \
             --plans /p --version 2",
        )
        .expect("parses");
        assert_eq!(a.command, "subscribe");
        assert!(a.json);
        assert_eq!(a.get("customer"), Some("c"));
        assert_eq!(a.get("plans"), Some("/p"));
        assert_eq!(a.version().expect("version"), Some(2));
        assert_eq!(
            a.time("start").expect("time"),
            Some(time::macros::datetime!(2025-01-01 0:00 UTC))
        );
        assert_eq!(parse("history --help").expect("help").command, "help");
    }

    #[test]
    fn migrate_plan_flags() {
        let a = parse(
            "migrate-plan --tenant t --plan pro --to-version 2 --id m1 --from-versions 1,2 \
             --customers a,b --effective 2026-04-01T00:00:00Z --preview",
        )
        .expect("parses");
        assert_eq!(a.get("preview"), Some("true"));
        let spec = migration_spec(&a).expect("spec");
        assert_eq!(spec.from_versions, Some(vec![1, 2]));
        assert_eq!(spec.customers, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(
            spec.effective,
            Effective::At(time::macros::datetime!(2026-04-01 0:00 UTC))
        );
        let a = parse("migrate-plan --tenant t --plan pro --to-version 2 --id m1").expect("parses");
        assert_eq!(
            migration_spec(&a).expect("spec").effective,
            Effective::NextPeriodStart
        );
        assert_eq!(
            refusal("migrate-plan --tenant t --plan pro --id m1"),
            "migrate-plan needs --to-version"
        );
        assert_eq!(
            refusal("list --tenant t --preview"),
            "list takes no flag --preview"
        );
        let a = parse("migrate-plan --tenant t --plan p --to-version x --id m").expect("parses");
        assert!(migration_spec(&a)
            .expect_err("bad")
            .to_string()
            .starts_with("--to-version: "));
        let a = parse("migrate-plan --tenant t --plan p --to-version 2 --id m --effective soon")
            .expect("parses");
        assert!(migration_spec(&a)
            .expect_err("bad")
            .to_string()
            .starts_with("--effective: "));
    }

    #[test]
    fn argument_errors_name_the_flag() {
        assert_eq!(
            refusal("subscribe --tenant t --customer c --start 2025-01-01T00:00:00Z"),
            "subscribe needs --plan"
        );
        assert_eq!(refusal("list --tenant"), "--tenant needs a value");
        assert_eq!(
            refusal("cancel --tenant t --customer c --at x --plan p"),
            "cancel takes no flag --plan"
        );
        assert_eq!(
            refusal("list --tenant a --tenant b"),
            "--tenant given twice"
        );
        assert_eq!(refusal("bill --tenant a"), "unknown command \"bill\"");
        assert_eq!(refusal("--json"), "no command given");
        assert_eq!(
            refusal("list extra --tenant a"),
            "unexpected argument \"extra\""
        );
        let a = parse("list --tenant t --at 2025-01-01T00:00:00.5Z").expect("parses");
        let e = a.time("at").expect_err("fraction");
        assert!(e.to_string().starts_with("--at: "), "{e}");
        let a =
            parse("change --tenant t --customer c --plan p --at x --version 0").expect("parses");
        assert!(a
            .version()
            .expect_err("zero")
            .to_string()
            .starts_with("--version: "));
        assert!(a
            .time("at")
            .expect_err("bad")
            .to_string()
            .starts_with("--at: \"x\""));
    }
}
