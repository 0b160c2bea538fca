//! Configuration: defaults, files, environment, overrides and the rules.

use super::*;

#[test]
fn defaults_are_valid_and_round_trip_through_the_default_file() {
    Config::default().validate().expect("defaults valid");
    let parsed = Config::from_toml(&Config::default_file()).expect("default file parses");
    assert_eq!(parsed, Config::default());
}

#[test]
fn a_file_from_an_older_init_still_loads() {
    // `init` wrote `store.max_peers` while there was a peers table.
    let c = Config::from_toml("[store]\nmax_peers = 10000\nmax_cards = 5\n").expect("loads");
    c.validate().expect("valid");
    assert_eq!(c.store.max_cards, 5);
    assert!(!Config::default_file().contains("max_peers"));
}

#[test]
fn file_errors_name_the_key() {
    let e = Config::from_toml("[network]\nmax_conections = 3\n").expect_err("unknown key");
    assert!(e.to_string().contains("max_conections"), "{e}");
    let e = Config::from_toml("[network]\nmax_connections = \"many\"\n").expect_err("type");
    assert!(e.to_string().contains("max_connections"), "{e}");
    let e = Config::from_toml("[network]\nlisten = [\"/ip9/x\"]\n").expect_err("multiaddr");
    assert!(e.to_string().contains("listen"), "{e}");
    let e = Config::from_toml("[dht]\nrecord_ttl = \"soon\"\n").expect_err("duration");
    assert!(e.to_string().contains("record_ttl"), "{e}");
    let e = Config::from_toml("network = [").expect_err("syntax");
    assert!(matches!(e, ConfigError::Parse { .. }));
}

#[test]
fn validation_names_key_and_value() {
    let cases = [
        (
            "[network]\nmax_connections = 0",
            "invalid network.max_connections = 0: must be at least 1",
        ),
        (
            "[network]\nmin_connections = 300",
            "invalid network.min_connections = 300: must not exceed network.max_connections (192)",
        ),
        (
            "[mesh]\nname = \"Bad Mesh\"",
            "invalid mesh.name = \"Bad Mesh\"",
        ),
        (
            "[mesh]\npsk = \"abcd\"",
            "invalid mesh.psk = <hidden>: must be 64 hex digits, got 4 characters",
        ),
        (
            "[dht]\nrepublish_interval = \"2h\"",
            "invalid dht.republish_interval = 2h",
        ),
        (
            "[dht]\nrefresh_interval = \"1s\"",
            "invalid dht.refresh_interval = 1s",
        ),
        (
            "[calls]\nburst_per_peer = 1",
            "invalid calls.burst_per_peer = 1",
        ),
        ("[gossip]\nmesh_n = 20", "invalid gossip.mesh_n = 20"),
        (
            "[store]\nmax_call_log = 0",
            "invalid store.max_call_log = 0",
        ),
        (
            "[network]\nping_interval = \"500ms\"",
            "invalid network.ping_interval = 500ms: must be at least 1s",
        ),
        (
            "[network]\nbootstrap = [\"/ip4/1.2.3.4/tcp/1\"]",
            "invalid network.bootstrap[0] = /ip4/1.2.3.4/tcp/1: must end with /p2p/<peer id>",
        ),
        (
            "[mail]\nmax_mailboxes = 5",
            "invalid mail.max_mailboxes = 5: must be at most 4",
        ),
    ];
    // No mailboxes at all is a choice (mail only while online), unless some are listed.
    assert!(Config::from_toml("[mail]\nmax_mailboxes = 0").is_ok());
    let peer = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let listed =
        format!("[mail]\nmax_mailboxes = 0\nmailboxes = [\"/ip4/1.2.3.4/tcp/1/p2p/{peer}\"]");
    assert_eq!(
        Config::from_toml(&listed).expect_err("listed").to_string(),
        "invalid mail.max_mailboxes = 0: must be at least 1 when mail.mailboxes lists any"
    );
    for (text, want) in cases {
        let e = Config::from_toml(text).expect_err(text).to_string();
        assert!(e.starts_with(want), "{text}: got {e:?}, want {want:?}");
    }
}

#[test]
fn zero_ping_interval_is_accepted() {
    let c = Config::from_toml("[network]\nping_interval = \"0s\"").expect("valid");
    assert!(c.network.ping_interval.is_zero());
}

#[test]
fn env_and_flags_override_in_order() {
    let mut c = Config::from_toml("[calls]\nrate_per_peer = 5\nburst_per_peer = 10").expect("ok");
    c.apply_env([
        ("SKILLMESH_CALLS_RATE_PER_PEER".to_owned(), "7".to_owned()),
        (
            "SKILLMESH_NETWORK_LISTEN".to_owned(),
            "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/udp/0/quic-v1".to_owned(),
        ),
        ("SKILLMESH_NETWORK_MDNS".to_owned(), "off".to_owned()),
        ("SKILLMESH_DHT_QUERY_TIMEOUT".to_owned(), "3s".to_owned()),
        ("SKILLMESH_DATA_DIR".to_owned(), "/somewhere".to_owned()),
        ("SKILLMESH_FUTURE_THING".to_owned(), "x".to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
    ])
    .expect("env");
    assert_eq!(c.calls.rate_per_peer, 7);
    assert_eq!(c.network.listen.len(), 2);
    assert!(!c.network.mdns);
    assert_eq!(c.dht.query_timeout, Duration::from_secs(3));
    c.set("calls.rate_per_peer", "9").expect("flag");
    assert_eq!(c.calls.rate_per_peer, 9);
}

#[test]
fn bad_env_and_flags_name_key_and_value_and_change_nothing() {
    let mut c = Config::default();
    let before = c.clone();
    let e = c
        .apply_env([(
            "SKILLMESH_CALLS_RATE_PER_PEER".to_owned(),
            "fast".to_owned(),
        )])
        .expect_err("not a number");
    assert_eq!(
        e.to_string(),
        "invalid calls.rate_per_peer = fast: must be a whole number"
    );
    let e = c
        .apply_env([("SKILLMESH_NETWORK_LISTN".to_owned(), "x".to_owned())])
        .expect_err("unknown");
    assert!(
        e.to_string().contains("network.listn")
            && e.to_string().contains("SKILLMESH_NETWORK_LISTN"),
        "{e}"
    );
    let e = c.set("network.max_connections", "0").expect_err("invalid");
    assert_eq!(
        e.to_string(),
        "invalid network.max_connections = 0: must be at least 1"
    );
    let e = c
        .set("network.listen", "/ip4/1.2.3.4/tcp/x")
        .expect_err("bad addr");
    assert!(
        e.to_string()
            .starts_with("invalid network.listen = /ip4/1.2.3.4/tcp/x"),
        "{e}"
    );
    let e = c
        .set("dht.record_ttl", "forever")
        .expect_err("bad duration");
    assert!(
        e.to_string()
            .starts_with("invalid dht.record_ttl = forever"),
        "{e}"
    );
    assert!(matches!(
        c.set("nosuch", "1"),
        Err(ConfigError::UnknownKey { .. })
    ));
    assert_eq!(c, before);
}

#[test]
fn missing_file_is_defaults_unless_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("none.toml");
    assert_eq!(
        Config::from_file(&p, false).expect("defaults"),
        Config::default()
    );
    assert!(matches!(
        Config::from_file(&p, true),
        Err(ConfigError::Read { .. })
    ));
    std::fs::write(&p, "[node]\nname = \"ada\"\n").expect("write");
    assert_eq!(Config::from_file(&p, true).expect("file").node.name, "ada");
}
