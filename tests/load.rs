//! `walcast load` end to end: the built binary runs a small load against a
//! fresh database on the test server (relay as a child process, and in
//! process with vsn 1.0.0 over several source addresses) with membership
//! churn, and must report complete, ordered, leak-free deliveries. No timing
//! assertions: the figures depend on the machine.

use std::process::Command;

use walcast::cluster::scratch_server;

/// Runs `walcast load --database-url <scratch> <args> --json-out …`; it
/// must exit 0. Returns its stdout, its JSON report, and whether it wrote
/// the SVG plot beside the report.
fn load(args: &[&str]) -> (String, serde_json::Value, bool) {
    let server = scratch_server().expect("scratch server");
    let dir = tempfile::tempdir().expect("temp dir");
    let json_out = dir.path().join("load.json");
    let output = Command::new(env!("CARGO_BIN_EXE_walcast"))
        .current_dir(dir.path())
        .args(["load", "--database-url", &server.url("postgres")])
        .args(args)
        .arg("--json-out")
        .arg(&json_out)
        .output()
        .expect("walcast load runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "walcast load failed ({}):\n{stdout}\n{stderr}", output.status);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_out).expect("the JSON report")).expect("JSON");
    let svg = json_out.with_extension("svg").exists();
    (stdout, report, svg)
}

fn run_load(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--clients", "40", "--users", "20", "--dealerships", "5", "--live-orders", "50"];
    if !extra.contains(&"--rate") {
        args.extend(["--rate", "200"]);
    }
    args.extend(["--duration", "3", "--churn", "3", "--drain-timeout", "20"]);
    args.extend(extra);
    let (stdout, report, svg) = load(&args);
    assert!(stdout.contains("result: PASS"), "{stdout}");
    assert!(svg, "the SVG plot");
    report
}

/// The run passed and the oracle found nothing wrong.
fn assert_checks(report: &serde_json::Value) {
    assert_eq!(report["passed"], true, "{report:#}");
    let checks = &report["results"]["checks"];
    for check in ["leaks", "duplicates", "missing", "out_of_order", "protocol_errors", "subscribe_failures"] {
        assert_eq!(checks[check], 0, "{check}: {checks:#}");
    }
}

fn assert_exact(report: &serde_json::Value) {
    let results = &report["results"];
    assert_checks(report);
    let deliveries = &results["deliveries"];
    assert!(deliveries["expected"].as_u64().unwrap() > 100, "{deliveries}");
    assert_eq!(deliveries["received"], deliveries["expected"]);
    assert_eq!(deliveries["correct"], deliveries["expected"]);
    assert_eq!(results["clients_subscribed"], 40);
    let writes = &results["writes"];
    assert!(writes["total"].as_u64().unwrap() > 100, "{writes}");
    assert!(writes["grants"].as_u64().unwrap() + writes["revokes"].as_u64().unwrap() > 0, "churn ran: {writes}");
    assert!(results["commit_to_receive"]["count"].as_u64().unwrap() > 0);
    assert_relay_share(results);
}

/// commit→socket (the kernel's receive timestamp of each read) was taken,
/// for deliveries the receiver threads read, and it never exceeds
/// commit→receive: a frame reaches the socket before it is parsed.
fn assert_relay_share(results: &serde_json::Value) {
    let (socket, receive) = (&results["commit_to_socket"], &results["commit_to_receive"]);
    let count = socket["count"].as_u64().unwrap_or(0);
    assert!(count > 0, "commit→socket measured: {results:#}");
    assert!(count <= receive["count"].as_u64().unwrap(), "{socket} vs {receive}");
    let ms = |v: &serde_json::Value| v["max_ms"].as_f64().unwrap();
    assert!(ms(socket) <= ms(receive) + 1.0, "socket {socket} after receive {receive}");
}

#[test]
fn a_small_load_through_a_child_relay_is_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let capture = dir.path().join("load.walcast");
    let report = run_load(&["--record-out", capture.to_str().unwrap()]);
    assert_exact(&report);
    assert!(report["results"]["relay_rss_kb"]["peak"].as_u64().unwrap() > 0, "relay RSS measured");

    // --record-out captured every write (order changes and churn), which
    // `walcast replay --subscribers` fans out without PostgreSQL.
    let writes = &report["results"]["writes"];
    let written = ["total", "grants", "revokes"].iter().map(|k| writes[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(report["results"]["recorded"]["transactions"].as_u64(), Some(written), "{:#}", report["results"]);
    let output = Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(["replay", "--json", "--subscribers", "100"])
        .arg(&capture)
        .output()
        .expect("walcast replay runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let replay: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(replay["changes"].as_u64(), Some(written), "{replay}");
    assert!(replay["deliveries"].as_u64().unwrap() > 0, "{replay}");
}

#[test]
fn a_batched_load_in_process_with_vsn_1_over_several_source_addresses_is_exact() {
    // One writer taking up to 32 queued writes per transaction (group
    // commit): the oracle's per-row order holds across batches.
    let report = run_load(&[
        "--relay",
        "inproc",
        "--vsn",
        "1.0.0",
        "--source-addrs",
        "3",
        "--rate",
        "2000",
        "--writers",
        "1",
        "--batch",
        "32",
    ]);
    assert_exact(&report);
    assert_eq!(report["config"]["source_addrs"], 3);
    let writes = &report["results"]["writes"];
    assert!(
        writes["transactions"].as_u64().unwrap() < writes["total"].as_u64().unwrap(),
        "writes were batched: {writes}"
    );
}

#[test]
fn idle_mode_reports_memory_per_connection() {
    let (_, report, _) =
        load(&["--idle", "--idle-secs", "1", "--clients", "30", "--users", "10", "--dealerships", "3"]);
    assert_eq!(report["results"]["clients_subscribed"], 30);
    assert!(report["results"]["relay_rss_per_connection_bytes"].is_number(), "{report:#}");
}

#[test]
fn broadcast_mode_delivers_every_message_once_to_every_other_member_of_its_room() {
    // 40 clients in 4 rooms of 10 (half 1.0.0, half 2.0.0), 200 messages:
    // each reaches the 9 other members of its sender's room, nobody else.
    let (stdout, report, _) = load(&[
        "--broadcast",
        "--clients",
        "40",
        "--rooms",
        "4",
        "--rate",
        "100",
        "--duration",
        "2",
        "--drain-timeout",
        "20",
        "--users",
        "10",
        "--dealerships",
        "2",
        "--live-orders",
        "10",
    ]);
    assert!(stdout.contains("result: PASS"), "{stdout}");
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(report["config"]["mode"], "broadcast");
    let results = &report["results"];
    for check in ["missing", "duplicates", "misrouted", "forged", "unsent", "protocol_errors", "subscribe_failures"] {
        assert_eq!(results["checks"][check], 0, "{check}: {:#}", results["checks"]);
    }
    assert_eq!(results["clients_subscribed"], 40);
    assert_eq!(results["sends"]["sent"], 200, "{:#}", results["sends"]);
    let deliveries = &results["deliveries"];
    assert_eq!(deliveries["expected"], 200 * 9, "{deliveries}");
    assert_eq!(deliveries["received"], 200 * 9, "{deliveries}");
    assert_eq!(deliveries["correct"], 200 * 9, "{deliveries}");
    assert_eq!(results["send_to_receive"]["count"], 200 * 9);
    assert!(results["relay_cpu"]["cpu_secs_per_million_deliveries"].is_number(), "{results:#}");
    assert!(results["relay_rss_kb"]["peak"].as_u64().unwrap() > 0, "relay RSS measured");

    // A mode the broadcast run cannot combine with is refused with a reason.
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_walcast"))
        .current_dir(dir.path())
        .args(["load", "--broadcast", "--idle", "--clients", "3", "--rooms", "2"])
        .output()
        .expect("walcast load runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("2 clients per room") || stderr.contains("--idle"), "{stderr}");
}

/// Every change goes to every one of 300 sockets: each batch is far over
/// what the hub writes itself, so the flusher tasks write it (on both
/// worker threads, concurrently with the hub) — and every client must still
/// get every change once, in commit order.
#[test]
fn a_fan_out_to_hundreds_of_sockets_per_change_is_exact() {
    let (_, report, _) = load(&[
        "--clients",
        "300",
        "--users",
        "30",
        "--dealerships",
        "1",
        "--live-orders",
        "50",
        "--rate",
        "100",
        "--batch",
        "10",
        "--writers",
        "2",
        "--duration",
        "3",
        "--drain-timeout",
        "30",
    ]);
    let results = &report["results"];
    assert_checks(&report);
    assert_eq!(results["clients_subscribed"], 300);
    let deliveries = &results["deliveries"];
    // ~300 changes, each to (nearly) every client.
    assert!(deliveries["expected"].as_u64().unwrap() > 20_000, "{deliveries}");
    assert_eq!(deliveries["received"], deliveries["expected"]);
    assert_eq!(deliveries["correct"], deliveries["expected"]);
}
