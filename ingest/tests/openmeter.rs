//! OpenMeter's own published Python client (`openmeter` on PyPI), pointed at the collector's
//! compatible route, as a team switching from OpenMeter would. `make test` provides the
//! Python environment (`TALLY_PYTHON`).

mod common;

use std::collections::HashSet;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openmeter_python_client_ingests_through_the_compatible_route() {
    let python = std::env::var("TALLY_PYTHON")
        .expect("TALLY_PYTHON names the test virtualenv's python; run the tests with `make test`");
    let topic = unique_topic("openmeter");
    let collector = start(config(&brokers(), &topic)).await;
    let base = format!("http://{}", collector.addr());
    let prefix = format!("om{}", std::process::id());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openmeter_client.py");

    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(&python)
            .arg(&script)
            .args([&base, "demo-key", &prefix])
            .output(),
    )
    .await
    .expect("client finished within 120 s")
    .expect("run the OpenMeter client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("report line")).expect("json");
    assert_eq!(report["invalid_refused"], true);
    let sent: HashSet<String> = report["sent"]
        .as_array()
        .expect("sent ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_owned())
        .collect();
    assert_eq!(sent.len(), 6);

    collector.shutdown().await;
    let stored = read_topic(&brokers(), &topic).await;
    let ids: HashSet<String> = stored.iter().map(|s| s.record.id.clone()).collect();
    assert_eq!(ids, sent, "exactly the client's valid events are stored");
    for s in &stored {
        assert_eq!(s.record.tenant, "demo");
        assert_eq!(
            s.record.customer,
            format!("{prefix}-cust"),
            "subject is the customer"
        );
        assert_eq!(s.record.source.as_deref(), Some("openmeter-python"));
        assert_eq!(s.key, format!("demo/{prefix}-cust"));
        assert_eq!(s.record.data["endpoint"], "/v1/x");
    }
}
