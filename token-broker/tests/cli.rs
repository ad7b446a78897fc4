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
    ("--shutdown-delay-seconds", "TOKEN_BROKER_SHUTDOWN_DELAY_SECONDS"),
    ("--shutdown-grace-seconds", "TOKEN_BROKER_SHUTDOWN_GRACE_SECONDS"),
    ("--watch-staleness-seconds", "TOKEN_BROKER_WATCH_STALENESS_SECONDS"),
    ("--sidecar-sources", "TOKEN_BROKER_SIDECAR_SOURCES"),
    ("--max-connections", "TOKEN_BROKER_MAX_CONNECTIONS"),
    ("--header-timeout-seconds", "TOKEN_BROKER_HEADER_TIMEOUT_SECONDS"),
];

/// Every switch (a flag without a value) and its environment variable.
const SWITCHES: &[(&str, &str)] = &[
    ("--skip-pod-address-check", "TOKEN_BROKER_SKIP_POD_ADDRESS_CHECK"),
    ("--allow-insecure-dev-in-cluster", "TOKEN_BROKER_ALLOW_INSECURE_DEV_IN_CLUSTER"),
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
    for (switch, env) in SWITCHES {
        assert!(help.contains(&format!("{switch}\n")), "--help does not list {switch}:\n{help}");
        assert!(help.contains(&format!("[env: {env}")), "--help does not name {env}:\n{help}");
    }
    assert!(help.contains("[default: 127.0.0.6 ::6]"), "{help}");
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
fn a_session_duration_inside_the_refresh_window_is_refused_at_start() {
    for short in ["900", "2400"] {
        let output = broker(&[
            "--identity-mode",
            "insecure-dev",
            "--sts-region",
            "us-east-1",
            "--kube-api-url",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--session-duration-seconds",
            short,
        ]);
        assert!(!output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains(&format!("--session-duration-seconds {short} is too short")), "{stdout}");
        assert!(stdout.contains("must be more than 2400"), "{stdout}");
    }
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
        .args(["--shutdown-delay-seconds", "1"])
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

/// A free loopback address to listen on.
fn free_listen() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("free port: {e}"));
    listener.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string()
}

/// `GET path` on `listen`, retried until the broker answers; the raw reply.
fn get(listen: &str, path: &str) -> String {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = std::net::TcpStream::connect(listen).and_then(|mut stream| {
            write!(stream, "GET {path} HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply)?;
            Ok(reply)
        });
        match reply {
            Ok(reply) => return reply,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the broker never answered: {e}"),
        }
    }
}

/// An insecure-dev broker with nothing to sync (no API server on port 9)
/// and the extra environment `env`.
fn insecure_dev(listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_token-broker"));
    command
        .args(["--identity-mode", "insecure-dev", "--sts-region", "us-east-1"])
        .args(["--kube-api-url", "http://127.0.0.1:9", "--listen", listen])
        .args(extra)
        .env_clear()
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// Inside a pod the kubelet sets this, as in-cluster configuration reads it.
const IN_A_CLUSTER: (&str, &str) = ("KUBERNETES_SERVICE_HOST", "10.96.0.1");

#[test]
fn insecure_dev_refuses_to_start_inside_a_cluster() {
    let output = insecure_dev(&free_listen(), &[], &[IN_A_CLUSTER]).output().unwrap_or_else(|e| panic!("{e}"));
    assert!(!output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("refuses to run inside a Kubernetes cluster"), "{stdout}");
    assert!(stdout.contains("--allow-insecure-dev-in-cluster"), "{stdout}");
}

#[test]
fn insecure_dev_is_never_ready_even_where_explicitly_allowed() {
    for (flags, env) in [
        (&["--allow-insecure-dev-in-cluster"][..], &[IN_A_CLUSTER][..]),
        (&[][..], &[IN_A_CLUSTER, ("TOKEN_BROKER_ALLOW_INSECURE_DEV_IN_CLUSTER", "true")][..]),
        // Outside a cluster it starts without being told.
        (&[][..], &[][..]),
    ] {
        let listen = free_listen();
        let mut child = insecure_dev(&listen, flags, env).spawn().unwrap_or_else(|e| panic!("{e}"));
        let healthz = get(&listen, "/healthz");
        let readyz = get(&listen, "/readyz");
        let _ = child.kill();
        let output = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        let log = String::from_utf8_lossy(&output.stdout);
        assert!(healthz.starts_with("HTTP/1.1 200"), "{flags:?} {env:?}: {healthz}\n{log}");
        assert!(readyz.starts_with("HTTP/1.1 503"), "{readyz}");
        assert!(readyz.contains("not ready: INSECURE-DEV IDENTITY MODE"), "{readyz}");
        assert!(log.contains("identity mode insecure-dev"), "no warning in the log:\n{log}");
    }
}

#[test]
fn sidecar_sources_are_addresses_or_cidr_blocks() {
    let output = broker(&["--sts-region", "us-east-1", "--sidecar-sources", "127.0.0.6,10.0.0.0/8,sidecar"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("\"sidecar\" is not an IP address or a CIDR block"), "{stderr}");
}
