//! The `token-broker` binary's command line: every option is a documented
//! flag with an environment variable.

use std::process::Command;

/// Every flag and its environment variable.
const FLAGS: &[(&str, &str)] = &[
    ("--listen", "TOKEN_BROKER_LISTEN"),
    ("--admin-listen", "TOKEN_BROKER_ADMIN_LISTEN"),
    ("--identity-mode", "TOKEN_BROKER_IDENTITY_MODE"),
    ("--own-spiffe-id", "TOKEN_BROKER_OWN_SPIFFE_ID"),
    ("--tls-cert", "TOKEN_BROKER_TLS_CERT"),
    ("--tls-key", "TOKEN_BROKER_TLS_KEY"),
    ("--tls-client-ca", "TOKEN_BROKER_TLS_CLIENT_CA"),
    ("--tls-reload-seconds", "TOKEN_BROKER_TLS_RELOAD_SECONDS"),
    ("--trust-domain", "TOKEN_BROKER_TRUST_DOMAIN"),
    ("--kube-api-url", "TOKEN_BROKER_KUBE_API_URL"),
    ("--instance", "TOKEN_BROKER_INSTANCE"),
    ("--sts-region", "TOKEN_BROKER_STS_REGION"),
    ("--sts-endpoint-url", "TOKEN_BROKER_STS_ENDPOINT_URL"),
    ("--session-duration-seconds", "TOKEN_BROKER_SESSION_DURATION_SECONDS"),
    ("--token-audience", "TOKEN_BROKER_TOKEN_AUDIENCE"),
    ("--token-lifetime-seconds", "TOKEN_BROKER_TOKEN_LIFETIME_SECONDS"),
    ("--namespace-policy-annotation", "TOKEN_BROKER_NAMESPACE_POLICY_ANNOTATION"),
    ("--log-format", "TOKEN_BROKER_LOG_FORMAT"),
    ("--log", "TOKEN_BROKER_LOG"),
    ("--shutdown-grace-seconds", "TOKEN_BROKER_SHUTDOWN_GRACE_SECONDS"),
];

fn broker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(args)
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("run token-broker: {e}"))
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    let output = broker(&["--help"]);
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for (flag, env) in FLAGS {
        assert!(help.contains(&format!("{flag} <")), "--help does not list {flag}:\n{help}");
        assert!(help.contains(&format!("[env: {env}")), "--help does not name {env}:\n{help}");
    }
    assert!(help.contains("insecure-dev"), "{help}");
    assert!(help.contains("[default: cluster.local]"), "{help}");
    assert!(help.contains("[default: sts.amazonaws.com]"), "{help}");
}

#[test]
fn the_sts_region_is_required() {
    let output = broker(&["--identity-mode", "insecure-dev"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--sts-region"), "{output:?}");
}

#[test]
fn xfcc_mode_needs_the_brokers_own_spiffe_id() {
    let output =
        broker(&["--sts-region", "us-east-1", "--kube-api-url", "http://127.0.0.1:9", "--listen", "127.0.0.1:0"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("--own-spiffe-id"), "{output:?}");
}

#[test]
fn mtls_mode_needs_its_three_tls_files() {
    let output = broker(&["--identity-mode", "mtls", "--sts-region", "us-east-1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for flag in ["--tls-cert", "--tls-key", "--tls-client-ca"] {
        assert!(stderr.contains(flag), "{flag} not named: {stderr}");
    }
}

#[test]
fn mtls_mode_with_an_unreadable_file_fails_at_start_naming_it() {
    let output = broker(&[
        "--identity-mode",
        "mtls",
        "--sts-region",
        "us-east-1",
        "--kube-api-url",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/tls.crt",
        "--tls-key",
        "/nonexistent/tls.key",
        "--tls-client-ca",
        "/nonexistent/ca.crt",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("/nonexistent/tls.crt"), "{output:?}");
}

#[test]
fn flags_of_another_identity_mode_are_refused_not_ignored() {
    let base = ["--sts-region", "us-east-1", "--kube-api-url", "http://127.0.0.1:9", "--listen", "127.0.0.1:0"];
    let output = broker(&[&base[..], &["--identity-mode", "insecure-dev", "--tls-cert", "/tmp/tls.crt"]].concat());
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("apply only to --identity-mode mtls"), "{output:?}");
    let output =
        broker(&[&base[..], &["--identity-mode", "insecure-dev", "--own-spiffe-id", "spiffe://a/ns/b/sa/c"]].concat());
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("--own-spiffe-id applies only"), "{output:?}");
}

#[test]
fn sigterm_stops_the_broker_within_the_grace_period() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("free port: {e}"))
        .port();
    let listen = format!("127.0.0.1:{port}");
    // Nothing listens on port 9: the pod watch never syncs, which does not
    // matter for serving /healthz or for shutting down.
    let mut child = Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .args(["--identity-mode", "insecure-dev", "--sts-region", "us-east-1"])
        .args(["--kube-api-url", "http://127.0.0.1:9", "--listen", &listen, "--shutdown-grace-seconds", "5"])
        .env_clear()
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start token-broker: {e}"));

    let deadline = Instant::now() + Duration::from_secs(30);
    let healthz = loop {
        let reply = std::net::TcpStream::connect(&listen).and_then(|mut stream| {
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        });
        match reply {
            Ok(reply) => break reply,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the broker never answered: {e}"),
        }
    };
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -TERM failed");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the broker did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
