//! Versioned ClickHouse migrations: `schemas/clickhouse/V<n>__<what>.sql`, applied in
//! order and recorded in `schema_migrations`.
//!
//! Applying is idempotent: applied versions are skipped (their checksum must not have
//! changed), and every statement is written to be re-runnable (`IF NOT EXISTS`; an
//! `ALTER TABLE … ADD COLUMN` of one column whose column exists counts as done, and so does
//! a `DROP COLUMN` of one column already gone), so a run killed between a statement and its
//! record finishes cleanly next time. Two runners at
//! once are not coordinated; start-up runs them from one place.
//!
//! A migration that fills a table from rows already stored (an `INSERT … SELECT`, such as
//! V11's backfill of `usage_daily` beside the view that keeps it current) is exact only if
//! no aggregator flushes while it runs: a flush between the view's creation and the
//! backfill would be counted by one and skipped by the other. Such a migration waits for
//! [`QUIET_SECS`] without a flush in `aggregator_checkpoints`; until then `apply` refuses it
//! with [`Error::WritersActive`] (retryable: services starting up wait, `migrate` commands
//! say so and stop). An aggregator with nothing to flush writes no checkpoint, so this
//! catches running pipelines, not idle ones: stop the aggregators before such an upgrade.

use std::path::{Path, PathBuf};

use clickhouse::Client;
use sha2::{Digest, Sha256};
use tally_core::config::ClickHouseConfig;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{file}: {reason}")]
    File { file: PathBuf, reason: String },
    #[error("migration V{version} ({name}) changed after it was applied: checksum {applied} in the database, {current} on disk")]
    Changed {
        version: u32,
        name: String,
        applied: String,
        current: String,
    },
    #[error(
        "migration V{version} ({name}) fills a table from stored rows and must run while no \
         aggregator flushes, but one flushed {seconds_ago} s ago: stop every aggregator, then \
         apply it ({QUIET_SECS} s after the last flush) with `tally-aggregator migrate`"
    )]
    WritersActive {
        version: u32,
        name: String,
        seconds_ago: i64,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// How long without an aggregator flush a backfilling migration waits for: ten flush
/// intervals at the default.
pub const QUIET_SECS: i64 = 10;

impl Error {
    /// ClickHouse being unreachable and aggregators flushing clear up by themselves; a bad
    /// or edited file does not.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::ClickHouse(clickhouse::error::Error::Network(_)) | Self::WritersActive { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One migration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: u32,
    pub name: String,
    pub checksum: String,
    pub statements: Vec<String>,
}

impl Migration {
    /// Whether it fills a table from rows already stored (an `INSERT` statement), and so
    /// must run while no aggregator flushes (see the module's documentation).
    pub fn fills_from_stored_rows(&self) -> bool {
        self.statements.iter().any(|s| {
            s.trim_start()
                .get(..6)
                .is_some_and(|w| w.eq_ignore_ascii_case("INSERT"))
        })
    }
}

/// Reads and orders every `V<n>__<name>.sql` in `dir`.
pub fn load(dir: &Path) -> Result<Vec<Migration>> {
    let file_err = |file: &Path, reason: String| Error::File {
        file: file.to_path_buf(),
        reason,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| file_err(dir, e.to_string()))?;
    let mut out: Vec<Migration> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| file_err(dir, e.to_string()))?.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = file_name.strip_suffix(".sql") else {
            continue;
        };
        let (version, name) = parse_name(stem).ok_or_else(|| {
            file_err(
                &path,
                "name must be V<number>__<name>.sql with name of a-z, 0-9 and _".into(),
            )
        })?;
        if let Some(other) = out.iter().find(|m| m.version == version) {
            return Err(file_err(
                &path,
                format!("version {version} already used by {}", other.name),
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e.to_string()))?;
        let statements = split_statements(&text);
        if statements.is_empty() {
            return Err(file_err(&path, "holds no statement".into()));
        }
        out.push(Migration {
            version,
            name,
            checksum: hex::encode(Sha256::digest(text.as_bytes())),
            statements,
        });
    }
    out.sort_by_key(|m| m.version);
    Ok(out)
}

fn parse_name(stem: &str) -> Option<(u32, String)> {
    let (v, name) = stem.strip_prefix('V')?.split_once("__")?;
    let version = v.parse().ok()?;
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    ok.then(|| (version, name.to_owned()))
}

/// Splits on `;` at the end of a line, dropping `--` comment lines.
fn split_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        let (body, ends) = match trimmed.strip_suffix(';') {
            Some(b) => (b, true),
            None => (line.trim_end(), false),
        };
        cur.push_str(body);
        cur.push('\n');
        if ends {
            out.push(std::mem::take(&mut cur).trim().to_owned());
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// A client for the configured database; validation is off because the crate's schema
/// check needs a newer server than the local 18.16.
pub fn client(config: &ClickHouseConfig) -> Client {
    Client::default()
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(&config.password)
        .with_database(&config.database)
        .with_validation(false)
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Applied {
    version: u32,
    checksum: String,
}

/// Creates the database if needed and applies every pending migration. Returns the
/// versions it applied (empty when the schema was current).
pub async fn apply(config: &ClickHouseConfig, migrations: &[Migration]) -> Result<Vec<u32>> {
    let database = &config.database;
    if !database
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        || database.is_empty()
    {
        return Err(Error::File {
            file: PathBuf::from("clickhouse.database"),
            reason: format!("{database:?} must be letters, digits and _"),
        });
    }
    let server = client(config).with_database("default");
    server
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await?;
    let db = client(config);
    db.query(
        "CREATE TABLE IF NOT EXISTS schema_migrations \
         (version UInt32, name String, checksum String, applied_at DateTime('UTC')) \
         ENGINE = MergeTree ORDER BY version",
    )
    .execute()
    .await?;
    let applied: Vec<Applied> = db
        .query("SELECT version, checksum FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await?;
    let mut done = Vec::new();
    for m in migrations {
        if let Some(a) = applied.iter().find(|a| a.version == m.version) {
            if a.checksum != m.checksum {
                return Err(Error::Changed {
                    version: m.version,
                    name: m.name.clone(),
                    applied: a.checksum.clone(),
                    current: m.checksum.clone(),
                });
            }
            continue;
        }
        if m.fills_from_stored_rows() {
            if let Some(seconds_ago) = last_flush(&db).await? {
                return Err(Error::WritersActive {
                    version: m.version,
                    name: m.name.clone(),
                    seconds_ago,
                });
            }
        }
        for statement in &m.statements {
            match db.query(statement).execute().await {
                Ok(()) => {}
                Err(e) if adds_existing_column(statement, &e.to_string()) => {}
                Err(e) if drops_missing_column(statement, &e.to_string()) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Names and checksums are [a-z0-9_] by construction: safe to inline.
        db.query(&format!(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES ({}, '{}', '{}', now())",
            m.version, m.name, m.checksum
        ))
        .execute()
        .await?;
        tracing::info!(version = m.version, name = %m.name, "migration applied");
        done.push(m.version);
    }
    Ok(done)
}

/// Seconds since the last aggregator flush, if one was within [`QUIET_SECS`] (each flush
/// writes a checkpoint row per partition it covers).
async fn last_flush(db: &Client) -> Result<Option<i64>> {
    let sql = format!(
        "SELECT toUInt64(count()), toInt64(now()) - toInt64(max(flushed_at)) \
         FROM aggregator_checkpoints WHERE flushed_at >= now() - {QUIET_SECS}"
    );
    match db.query(&sql).fetch_one::<(u64, i64)>().await {
        Ok((0, _)) => Ok(None),
        Ok((_, ago)) => Ok(Some(ago.max(0))),
        // No checkpoint table: nothing has ever flushed into this database.
        Err(e) if e.to_string().contains("doesn't exist") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`: an `ALTER TABLE … ADD COLUMN` (one
/// column per statement) that finds its column there was applied by a run killed before
/// recording it, and counts as done.
fn adds_existing_column(statement: &str, error: &str) -> bool {
    let s = statement.trim_start().to_ascii_uppercase();
    s.starts_with("ALTER TABLE")
        && s.matches("ADD COLUMN").count() == 1
        && error.contains("column with this name already exists")
}

/// Nor `DROP COLUMN IF EXISTS`: an `ALTER TABLE … DROP COLUMN` (one column per statement)
/// that finds its column gone was applied by a run killed before recording it.
fn drops_missing_column(statement: &str, error: &str) -> bool {
    let s = statement.trim_start().to_ascii_uppercase();
    s.starts_with("ALTER TABLE")
        && s.matches("DROP COLUMN").count() == 1
        && (error.contains("Cannot find column") || error.contains("There is no column"))
}

/// The repository's migrations folder.
pub fn default_dir() -> PathBuf {
    std::env::var_os("TALLY_SCHEMAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/clickhouse"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_add_column_that_exists_counts_as_done() {
        let exists = "Code: 44, e.displayText() = DB::Exception: Cannot add column run_id: \
                      column with this name already exists";
        assert!(adds_existing_column(
            "ALTER TABLE t ADD COLUMN run_id String DEFAULT ''",
            exists
        ));
        assert!(!adds_existing_column(
            "ALTER TABLE t ADD COLUMN a String, ADD COLUMN b String",
            exists
        ));
        assert!(!adds_existing_column(
            "ALTER TABLE t ADD COLUMN a String",
            "Table default.t doesn't exist"
        ));
        assert!(!adds_existing_column("CREATE TABLE t (a String)", exists));
    }

    #[test]
    fn only_a_single_drop_column_that_is_gone_counts_as_done() {
        // 18.16's words, then today's.
        let gone = [
            "Code: 44, e.displayText() = DB::Exception: Wrong column name. Cannot find column \
             value_unique to drop",
            "Code: 10. DB::Exception: Wrong column. Cannot find column `value_unique` to drop. \
             (NOT_FOUND_COLUMN_IN_BLOCK)",
        ];
        for error in gone {
            assert!(drops_missing_column(
                "ALTER TABLE usage_daily DROP COLUMN value_unique",
                error
            ));
            assert!(!drops_missing_column(
                "ALTER TABLE t DROP COLUMN a, DROP COLUMN b",
                error
            ));
            assert!(!drops_missing_column("DROP TABLE t", error));
        }
        assert!(!drops_missing_column(
            "ALTER TABLE t DROP COLUMN a",
            "Table default.t doesn't exist"
        ));
    }

    #[test]
    fn names_are_versioned() {
        assert_eq!(parse_name("V1__events_raw"), Some((1, "events_raw".into())));
        assert_eq!(parse_name("V12__a_b2"), Some((12, "a_b2".into())));
        for bad in ["1__x", "V__x", "Vx__y", "V1_x", "V1__", "V1__X", "V1__a-b"] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn statements_split_at_line_ends() {
        let sql =
            "-- comment; not a split\nCREATE TABLE a (x String);\n\nCREATE TABLE b\n(y String)\n";
        assert_eq!(
            split_statements(sql),
            ["CREATE TABLE a (x String)", "CREATE TABLE b\n(y String)"]
        );
    }

    #[test]
    fn only_backfills_wait_for_quiet_aggregators() {
        let all = load(&default_dir()).expect("schemas load");
        let filling: Vec<u32> = all
            .iter()
            .filter(|m| m.fills_from_stored_rows())
            .map(|m| m.version)
            .collect();
        // V11 fills usage_daily from rollups_hourly, V13 the unique states' tables from
        // both; every other migration only declares.
        assert_eq!(filling, [11, 13]);
        let m = |sql: &str| Migration {
            version: 1,
            name: "x".into(),
            checksum: String::new(),
            statements: vec![sql.into()],
        };
        assert!(m("  insert into t SELECT 1").fills_from_stored_rows());
        assert!(!m("CREATE TABLE t (x UInt8) ENGINE = Memory").fills_from_stored_rows());
        assert!(!m("INS").fills_from_stored_rows());
    }

    #[test]
    fn the_repository_migrations_load_in_order() {
        let all = load(&default_dir()).expect("schemas load");
        assert!(!all.is_empty());
        assert!(all.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(all[0].version, 1);
    }
}
