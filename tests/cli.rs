//! The `skillmesh` binary, run as a user would: init, keys, config; errors are one line.

use std::path::Path;
use std::process::{Command, Output};

fn skillmesh(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skillmesh"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("SKILLMESH_CONFIG")
        .output()
        .expect("run skillmesh")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_creates_identity_once_and_keys_show_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = skillmesh(dir.path(), &["init"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let peer_id = stdout(&first).trim().to_owned();
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");
    assert!(dir.path().join("config.toml").exists());

    let again = skillmesh(dir.path(), &["--json", "init"]);
    assert!(again.status.success());
    let v: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json");
    assert_eq!(v["peer_id"], peer_id.as_str());
    assert_eq!(v["created_identity"], false);

    let keys = skillmesh(dir.path(), &["--json", "keys", "show"]);
    let v: serde_json::Value = serde_json::from_slice(&keys.stdout).expect("json");
    assert_eq!(v["peer_id"], peer_id.as_str());
    assert_eq!(v["ed25519_public_key"].as_str().map(str::len), Some(64));
}

#[test]
fn config_layers_show_in_config_show() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(skillmesh(dir.path(), &["init"]).status.success());
    std::fs::write(
        dir.path().join("config.toml"),
        "[node]\nname = \"from-file\"\n[calls]\nrate_per_peer = 5\nburst_per_peer = 50\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_skillmesh"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--json", "--set", "calls.rate_per_peer=9", "config", "show"])
        .env("SKILLMESH_CALLS_BURST_PER_PEER", "70")
        .env("SKILLMESH_NODE_NAME", "from-env")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["node"]["name"], "from-env");
    assert_eq!(v["calls"]["rate_per_peer"], 9);
    assert_eq!(v["calls"]["burst_per_peer"], 70);
}

#[test]
fn bad_input_gives_one_clear_line_and_distinct_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");

    // No identity yet.
    let o = skillmesh(dir.path(), &["keys", "show"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("skillmesh init"), "{}", stderr(&o));

    assert!(skillmesh(dir.path(), &["init"]).status.success());

    // A corrupt config file: usage/config error, exit 2, names the key.
    std::fs::write(
        dir.path().join("config.toml"),
        "[network]\nmax_connections = 0\n",
    )
    .expect("write");
    let o = skillmesh(dir.path(), &["config", "check"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("network.max_connections = 0"), "{err}");

    std::fs::write(dir.path().join("config.toml"), "this is [not toml").expect("write");
    let o = skillmesh(dir.path(), &["config", "check"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    // A bad --set.
    std::fs::write(dir.path().join("config.toml"), "").expect("write");
    let o = skillmesh(
        dir.path(),
        &["--set", "calls.rate_per_peer=lots", "config", "check"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("calls.rate_per_peer = lots"),
        "{}",
        stderr(&o)
    );

    // A corrupt key file: failure, exit 1, one line, and the file is left alone.
    let key = dir.path().join("identity.key");
    std::fs::write(&key, b"garbage").expect("write");
    let o = skillmesh(dir.path(), &["init"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("corrupt") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(std::fs::read(&key).expect("read"), b"garbage");
}

#[test]
fn skills_appended_to_the_generated_config_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(skillmesh(dir.path(), &["init"]).status.success());
    let path = dir.path().join("config.toml");
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str("\n[[skills]]\nname = \"upper\"\nversion = \"1.0.0\"\ncommand = [\"cat\"]\n");
    std::fs::write(&path, text).expect("write");
    let o = skillmesh(dir.path(), &["--json", "config", "show"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["skills"][0]["name"], "upper");
}
