//! The CI scenarios: with no faults, everything is found, answered and delivered.

use std::path::Path;

fn scenario(name: &str) -> skillmesh_netsim::Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name);
    skillmesh_netsim::Scenario::from_file(&path).expect("scenario")
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke_20_finds_calls_and_delivers_everything() {
    let report = skillmesh_netsim::run(&scenario("smoke-20.toml"))
        .await
        .expect("run");
    println!("{}", report.table());
    assert_eq!(report.discovery_success, 1.0, "{report:?}");
    assert_eq!(report.call_success, 1.0, "{report:?}");
    assert!(report.gossip_delivery >= 0.99, "{report:?}");
    assert_eq!(report.gossip_duplicates, 0);
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
