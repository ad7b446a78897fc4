//! `just demo` runs end to end: the demo binary exits 0 after boto3 in the
//! "pod" got the pod's role from STS and another workload was refused, the
//! refusal read back from the API server as an Event on the pod.

use std::process::Command;

#[test]
fn the_demo_runs_end_to_end() {
    let output = Command::new(env!("CARGO_BIN_EXE_demo")).output().unwrap_or_else(|e| panic!("run the demo: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("arn:aws:sts::123456789012:assumed-role/app/default.app"), "{stdout}");
    assert!(stdout.contains("403 AccessDenied"), "{stdout}");
    assert!(stdout.contains("Event on the pod (API server)  Warning ImdsCredentialsDenied"), "{stdout}");
    assert!(stdout.contains("tokens STS accepted / refused  1 / 0"), "{stdout}");
    assert!(
        stdout.contains("broker audit log               issued spiffe://cluster.local/ns/default/sa/app"),
        "{stdout}"
    );
    assert!(
        stdout.contains("broker audit log               denied spiffe://cluster.local/ns/default/sa/intruder"),
        "{stdout}"
    );
    assert!(stdout.contains("imds-mesh demo: OK"), "{stdout}");
}
