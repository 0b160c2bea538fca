//! Real `skillmesh run` daemons driven through the CLI, optionally inside a network namespace.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_skillmesh");

pub struct Daemon {
    pub child: Child,
    pub info: Value,
    pub dir: tempfile::TempDir,
    /// The network namespace it runs in, if any.
    pub netns: Option<String>,
}

impl Daemon {
    pub fn start(config: &str, extra: &[&str]) -> Daemon {
        Self::start_in(None, config, extra)
    }

    /// Starts a daemon inside network namespace `netns` (`ip netns exec`).
    pub fn start_in(netns: Option<&str>, config: &str, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.toml"), config).expect("config");
        let mut child = command(netns)
            .arg("--data-dir")
            .arg(dir.path())
            .args(if std::env::var_os("SKILLMESH_TEST_LOGS").is_some() {
                ["--json", "-v", "run"]
            } else {
                ["--json", "-q", "run"]
            })
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(match std::env::var_os("SKILLMESH_TEST_LOGS") {
                Some(_) => Stdio::inherit(),
                None => Stdio::null(),
            })
            .spawn()
            .expect("spawn daemon");
        // `run --json` prints one JSON document once the node listens and the API is up.
        let mut text = String::new();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        loop {
            let mut line = String::new();
            if out.read_line(&mut line).expect("read") == 0 {
                panic!("daemon exited before it was ready: {text}");
            }
            text.push_str(&line);
            if line.trim_end() == "}" {
                break;
            }
        }
        let info: Value = serde_json::from_str(&text).expect("json");
        Daemon {
            child,
            info,
            dir,
            netns: netns.map(str::to_owned),
        }
    }

    pub fn addr(&self) -> String {
        self.info["listen_addrs"][0]
            .as_str()
            .expect("addr")
            .to_owned()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        command(self.netns.as_deref())
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run cli")
    }

    /// SIGTERM, then wait: a clean exit removes the API files.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "daemon exit: {status}");
        assert!(
            !self.dir.path().join("api.addr").exists(),
            "api.addr left behind"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CLI, inside `netns` when given.
pub fn command(netns: Option<&str>) -> Command {
    match netns {
        None => Command::new(BIN),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
    }
}

pub fn cli(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run cli")
}

pub fn json_out(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("json output")
}

/// Exactly one line on stderr, no panic or backtrace.
pub fn one_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    err
}
