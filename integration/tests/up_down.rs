//! `just up` and `just down` as a user meets them (`scripts/up.sh`,
//! `scripts/down.sh`, the `up` binary): the stack comes up and says how to
//! point a program at it, boto3 with exactly that environment gets the
//! pod's role, a second `up` says it is already up, `down` stops every
//! process and removes the files; and the bad states: the metadata address
//! taken, a piece that fails to start.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use integration::{istio, paths};

fn script(name: &str) -> Command {
    Command::new(paths::repo_root().join("scripts").join(name))
}

fn up(state: &Path, metadata: &str) -> Command {
    let mut command = script("up.sh");
    command.arg(state).arg(env!("CARGO_BIN_EXE_up")).arg(metadata);
    command
}

/// Runs `command`: whether it succeeded, its stdout and its stderr.
fn run(command: &mut Command) -> (bool, String, String) {
    let Output { status, stdout, stderr } = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    (status.success(), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned())
}

/// The variables of the `export` lines `up` printed.
fn exports(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .flat_map(str::split_whitespace)
        .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

/// Whether any process of the session `pid` leads is alive.
fn session_alive(pid: &str) -> bool {
    Command::new("kill").args(["-0", "--", &format!("-{pid}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn up_serves_a_program_then_down_stops_everything_and_bad_states_are_named() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let state = dir.path().join("up");
    let metadata = istio::loopback_port(80).to_string();

    let (ok, stdout, stderr) = run(&mut up(&state, &metadata));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("imds-mesh is up"), "{stdout}");
    let env = exports(&stdout);
    assert_eq!(env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT").map(String::as_str), Some("http://169.254.169.254/"));
    assert_eq!(env.get("HTTP_PROXY"), Some(&format!("http://{metadata}")), "{stdout}");
    let pid = std::fs::read_to_string(state.join("pid")).unwrap_or_else(|e| panic!("{e}")).trim().to_owned();

    // An unmodified boto3 program, given exactly what `up` printed.
    let whoami = Command::new(paths::python())
        .arg(paths::repo_root().join("integration/clients/whoami.py"))
        .env_clear()
        .envs(&env)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&whoami.stdout);
    assert!(whoami.status.success(), "{text}{}", String::from_utf8_lossy(&whoami.stderr));
    let whoami: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(whoami["method"], "iam-role", "{whoami}");
    let arn = whoami["arn"].as_str().unwrap_or_default();
    assert!(arn.starts_with("arn:aws:sts::123456789012:assumed-role/app/"), "{whoami}");

    let (ok, _, stderr) = run(&mut up(&state, &metadata));
    assert!(!ok);
    assert!(stderr.contains(&format!("imds-mesh is already up (pid {pid})")), "{stderr}");

    let (ok, stdout, stderr) = run(script("down.sh").arg(&state));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("imds-mesh is down"), "{stdout}");
    assert!(!session_alive(&pid), "a process of the stack outlived `down`");
    assert!(!state.exists(), "`down` left {}", state.display());
    let (ok, stdout, _) = run(script("down.sh").arg(&state));
    assert!(ok && stdout.contains("imds-mesh is not up"), "{stdout}");

    // The metadata address is taken.
    let taken = std::net::TcpListener::bind(&metadata).unwrap_or_else(|e| panic!("{metadata}: {e}"));
    let (ok, _, stderr) = run(&mut up(&state, &metadata));
    assert!(!ok);
    assert!(stderr.contains(&format!("{metadata}, where the metadata service would stand, is taken")), "{stderr}");
    drop(taken);

    // A piece fails to start: named, with where to read more, and nothing
    // of the stack left running.
    let (ok, _, stderr) = run(up(&state, &metadata).env("IMDS_MESH_BROKER_BIN", "/bin/false"));
    assert!(!ok);
    assert!(stderr.contains("imds-mesh failed to start:\ntoken-broker exited with exit status: 1"), "{stderr}");
    assert!(stderr.contains(&state.join("up.log").display().to_string()), "{stderr}");
    assert!(state.join("up.log").exists(), "the failed stack's log is gone");
    assert!(!state.join("pid").exists());
    let (ok, stdout, _) = run(script("down.sh").arg(&state));
    assert!(ok && stdout.contains("imds-mesh is not up"), "{stdout}");
    assert!(!state.exists());
}
