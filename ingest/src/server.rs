//! The listener and its lifecycle: serve until told to stop, then drain and flush.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tally_core::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::http::App;
use crate::kafka::KafkaSink;

/// A running collector.
pub struct Collector {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Collector {
    /// The address it listens on (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight requests finish (within the grace period), flushes
    /// the producer, and returns when all of that is done.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts a collector on `config.collector.listen` against the configured broker. The
/// broker need not be up: until it answers, event requests get 503.
pub async fn serve(config: Config) -> Result<Collector> {
    crate::metrics::prometheus();
    let sink = Arc::new(KafkaSink::new(&config.kafka)?);
    let health = sink.spawn_health(config.kafka.clone());
    let listener = TcpListener::bind(&config.collector.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.collector.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: config.collector.listen.clone(),
        source,
    })?;
    let grace = Duration::from_secs(config.collector.shutdown_grace_secs);
    let app = Arc::new(App::new(config, sink.clone()));
    let (stop, mut stopped) = watch::channel(false);
    tracing::info!(%addr, "collector listening");

    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let upkeep = tokio::spawn(async {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                crate::metrics::prometheus().run_upkeep();
            }
        });
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let app = app.clone();
                    let service = service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(app.handle(req).await) }
                    });
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                _ = stopped.changed() => break,
            }
        }
        drop(listener);
        tracing::info!("shutting down: draining in-flight requests");
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "in-flight requests still running at the end of the grace period"
            );
        }
        sink.close(grace).await;
        health.abort();
        upkeep.abort();
        tracing::info!("collector stopped");
    });
    Ok(Collector { addr, stop, task })
}
