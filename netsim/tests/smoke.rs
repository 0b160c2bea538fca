//! The CI scenarios: with no faults, everything is found, answered and delivered, and nothing
//! crosses a partition.

use std::path::Path;

/// One scenario at a time: each loads both cores, and two at once would measure the machine.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a shipped scenario and prints its table (shown when a test fails).
async fn run(name: &str) -> skillmesh_netsim::Report {
    let _machine = MACHINE.lock().await;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name);
    let scenario = skillmesh_netsim::Scenario::from_file(&path).expect("scenario");
    let report = skillmesh_netsim::run(&scenario).await.expect("run");
    println!("{}", report.table());
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke_20_finds_calls_and_delivers_everything() {
    let report = run("smoke-20.toml").await;
    assert_eq!(report.lookups.discovery_success, 1.0, "{report:?}");
    assert_eq!(report.calling.call_success, 1.0, "{report:?}");
    assert!(report.events.gossip_delivery >= 0.99, "{report:?}");
    assert_eq!(report.events.gossip_duplicates, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_30_nat_partition_and_mail() {
    let report = run("faults-30.toml").await;
    assert!(report.run.behind_nat > 0);
    assert_eq!(report.calling.call_success, 1.0, "{report:?}");
    // 10 ms one-way: a call is at least a round trip, however fast the machine.
    assert!(report.calling.calls.p50_ms >= 20.0, "{report:?}");
    assert!(report.events.gossip_delivery >= 0.99, "{report:?}");
    // Nodes behind NAT hold reservations; some calls to them went through relay circuits or
    // were hole-punched, and the model blocked direct dials into NATs.
    assert!(report.connections.reservations > 0, "{report:?}");
    assert!(report.dials.nat_blocked > 0, "{report:?}");
    // Pairs behind endpoint-independent NATs connect directly; nothing gets through an
    // endpoint-dependent NAT to a peer behind another NAT.
    let pairs = &report.connections.by_nat_pair;
    let eim = pairs.iter().find(|p| p.kinds == "EIM-EIM");
    assert!(eim.is_some_and(|p| p.direct > 0), "{pairs:?}");
    for p in pairs
        .iter()
        .filter(|p| p.kinds == "EIM-EDM" || p.kinds == "EDM-EDM")
    {
        assert_eq!(p.direct, 0, "{pairs:?}");
    }
    let p = report.partition.as_ref().expect("partition phase");
    assert_eq!(p.cross_deliveries, 0, "{report:?}");
    assert!(p.inside_delivery >= 0.99, "{report:?}");
    assert!(report.dials.partitioned > 0, "{report:?}");
    let m = report.mail.as_ref().expect("mail phase");
    assert_eq!(m.delivered, m.sent, "{report:?}");
}

/// The 200-node CI run: 200 nodes join within a minute or two, then with no faults every
/// lookup finds every server and every call is answered; then a partition that nothing crosses.
#[tokio::test(flavor = "multi_thread")]
async fn partition_heal_200_finds_calls_and_keeps_the_cut() {
    let report = run("partition-heal-200.toml").await;
    assert_eq!(report.run.nodes, 200);
    assert_eq!(report.lookups.discovery_success, 1.0, "{report:?}");
    assert_eq!(report.calling.call_success, 1.0, "{report:?}");
    assert!(report.events.gossip_delivery >= 0.99, "{report:?}");
    let p = report.partition.as_ref().expect("partition phase");
    assert_eq!(p.cross_deliveries, 0, "{report:?}");
    assert!(p.cross_calls > 0, "{report:?}");
    assert_eq!(p.cross_calls_answered, 0, "{report:?}");
    assert!(p.inside_delivery >= 0.99, "{report:?}");
    assert!(report.dials.partitioned > 0, "{report:?}");
}

#[test]
fn scenarios_are_checked() {
    let bad = |t: &str| skillmesh_netsim::Scenario::from_toml(t).is_err();
    assert!(bad(
        "name = \"x\"\nseed = 1\nnodes = 1\nskills = 1\nlookups = 1\ncalls = 1\nevents = 1"
    ));
    assert!(bad(
        "name = \"x\"\nseed = 1\nnodes = 5\nbootstrap = 5\nskills = 1\nlookups = 1\ncalls = 1\nevents = 1"
    ));
    assert!(bad(
        "name = \"x\"\nseed = 1\nnodes = 5\nskills = 1\nlookups = 1\ncalls = 1\nevents = 1\nunknown = 2"
    ));
    // Every shipped scenario parses.
    for entry in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")).expect("dir")
    {
        let path = entry.expect("entry").path();
        skillmesh_netsim::Scenario::from_file(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
