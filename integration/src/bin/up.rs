//! `just up`: the local stack of `just demo` ([`integration::stack`]), left
//! running for your own programs until `just down`.
//!
//! Started by `scripts/up.sh` in a session of its own, so `just down` stops
//! it and every process it started at once. It keeps its files under the
//! state directory it is given, writes `ready` there (what a user needs:
//! the metadata endpoint, the role, logs, metrics) once everything answers,
//! then waits to be stopped. If a piece fails to start it exits non-zero,
//! having said which piece and where its log is.
//!
//! Usage: `up STATE_DIR METADATA_ADDRESS`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use integration::ROLE_ARN;
use integration::stack::Stack;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(state), Some(metadata)) = (args.next(), args.next()) else {
        eprintln!("usage: up STATE_DIR METADATA_ADDRESS");
        return ExitCode::from(2);
    };
    let Ok(metadata) = metadata.parse::<SocketAddr>() else {
        eprintln!("up: {metadata:?} is not an address (like 127.169.254.254:80)");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("up: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state = PathBuf::from(state);
    // The harness panics when a piece fails, naming it and quoting its log.
    // The first panic's message goes to `failed` for `scripts/up.sh` to
    // show (what the pieces stopping after it print is in `up.log`); a
    // task turns the panic into an exit status.
    let failed = state.join("failed");
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !failed.exists() {
            // "panicked at <file:line:col>:\n<message>"
            let text = info.to_string();
            let message = text.split_once(":\n").map_or(text.as_str(), |(_, message)| message);
            let _ = std::fs::write(&failed, message);
        }
        report(info);
    }));
    let state_dir = state.clone();
    let outcome = runtime.block_on(async move { tokio::spawn(up(state, metadata)).await });
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(message)) => {
            let _ = std::fs::write(state_dir.join("failed"), &message);
            eprintln!("up: {message}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

async fn up(state: PathBuf, metadata: SocketAddr) -> Result<(), String> {
    let files = state.join("files");
    std::fs::create_dir_all(&files).map_err(|e| format!("{}: {e}", files.display()))?;
    let stack = Stack::start(&files, Some(metadata), &mut |stage, facts| {
        println!("==> {stage}");
        for (label, value) in facts {
            println!("    {label:<30} {value}");
        }
    })
    .await?;
    stack.app.wait_for_credentials(integration::ROLE_NAME).await;
    let ready = summary(&stack, &state);
    let path = state.join("ready");
    std::fs::write(&path, &ready).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{ready}");
    // Until `just down` ends the session.
    std::future::pending::<()>().await;
    Ok(())
}

/// What a user needs to point a program at the stack.
fn summary(stack: &Stack, state: &Path) -> String {
    let log = |dir: Option<&Path>, file: &str| dir.map(|d| d.join(file).display().to_string()).unwrap_or_default();
    let pod = &stack.pod;
    [
        "imds-mesh is up. In the shell of your program (it plays the pod's app):".to_owned(),
        "  export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://169.254.169.254/".to_owned(),
        format!("  export HTTP_PROXY=http://{} NO_PROXY=127.0.0.1", stack.app.metadata),
        format!("  export AWS_ENDPOINT_URL_STS={} AWS_DEFAULT_REGION=us-east-1", stack.sts.endpoint()),
        "The proxy stands for the pod's traffic capture (no iptables here): plain HTTP to".to_owned(),
        "169.254.169.254 reaches the pod's sidecar as it would in a pod. Any SDK that honours".to_owned(),
        "HTTP_PROXY for the metadata service works (botocore/boto3, the AWS CLI, the Go SDK).".to_owned(),
        String::new(),
        format!("role            {ROLE_ARN}"),
        format!("pod             {}/{} (service account {})", pod.namespace, pod.name, pod.service_account),
        format!("kubeconfig      {} (admin)", stack.dir.join("admin.kubeconfig").display()),
        format!("API server      {}", stack.kube.url),
        format!("broker metrics  http://{}/metrics", stack.broker.admin),
        format!("sidecar stats   http://{}/stats (the app sidecar's Envoy admin)", stack.app.envoy.admin_addr),
        "logs".to_owned(),
        format!("  token-broker    {}", stack.broker.log.display()),
        format!("  app sidecar     {}", log(stack.app.envoy.dir(), "envoy.log")),
        format!("  broker sidecar  {}", log(stack.broker_sidecar.dir(), "envoy.log")),
        format!("  STS (moto)      {}", stack.sts.log_path().map(|p| p.display().to_string()).unwrap_or_default()),
        format!("  API server      {}", stack.kube.dir().join("kube-apiserver.log").display()),
        format!("  this stack      {}", state.join("up.log").display()),
        String::new(),
        "Stop everything with: just down".to_owned(),
    ]
    .join("\n")
}
