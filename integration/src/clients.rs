//! Real AWS SDK clients run as child processes against an Envoy, with
//! nothing from the developer's `~/.aws` or `AWS_*` environment steering them
//! (a profile can set the endpoint or disable IMDSv1); and credentials STS
//! really issued, for clients that go on to use them.

use std::ffi::OsStr;

use serde_json::Value;
use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::sts::xml_element;
use crate::{Envoy, Scripted, Sts, paths, wait};

/// A client program pointed at `envoy`'s IMDS endpoint.
pub struct SdkClient {
    command: tokio::process::Command,
    name: String,
    _no_config: TempDir,
}

impl SdkClient {
    /// `program args...` with a clean AWS environment whose only IMDS
    /// setting is `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn new(program: impl AsRef<OsStr>, args: &[&OsStr], envoy: &Envoy) -> Self {
        let no_config = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut command = tokio::process::Command::new(program.as_ref());
        command.args(args).kill_on_drop(true);
        for (name, _) in std::env::vars_os().filter(|(name, _)| name.to_string_lossy().starts_with("AWS_")) {
            command.env_remove(name);
        }
        command
            .env("HOME", no_config.path())
            .env("AWS_CONFIG_FILE", no_config.path().join("config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", no_config.path().join("credentials"))
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", envoy.endpoint());
        let name = args.last().copied().unwrap_or_else(|| program.as_ref()).to_string_lossy().into_owned();
        Self { command, name, _no_config: no_config }
    }

    /// The venv's Python running `integration/clients/<script>`.
    pub fn python(script: &str, envoy: &Envoy) -> Self {
        let script = paths::repo_root().join("integration/clients").join(script);
        Self::new(paths::python(), &[script.as_os_str()], envoy)
    }

    /// node running `integration/clients/<script>`.
    pub fn node(script: &str, envoy: &Envoy) -> Self {
        let clients = paths::repo_root().join("integration/clients");
        assert!(clients.join("node_modules").exists(), "{} has no node_modules: run `just setup`", clients.display());
        let mut client = Self::new("node", &[clients.join(script).as_os_str()], envoy);
        client.command.current_dir(&clients);
        client
    }

    /// The AWS SDK for Go v2 app (`integration/sdk-go`, `just sdk-go`):
    /// `config.LoadDefaultConfig`'s chain, then STS `GetCallerIdentity`.
    pub fn go(envoy: &Envoy) -> Self {
        Self::new(paths::sdk_go(), &[], envoy)
    }

    /// The AWS SDK for Java v2 app (`integration/sdk-java`, `just
    /// sdk-java`): `InstanceProfileCredentialsProvider`, then STS
    /// `GetCallerIdentity`.
    pub fn java(envoy: &Envoy) -> Self {
        let jar = paths::sdk_java();
        Self::new("java", &[OsStr::new("-jar"), jar.as_os_str()], envoy)
    }

    /// Sends the client's STS calls to `sts`, in `us-east-1`, as an app is
    /// pointed at an endpoint: by `AWS_ENDPOINT_URL_STS`.
    pub fn sts(self, sts: &Sts) -> Self {
        self.env("AWS_ENDPOINT_URL_STS", &sts.endpoint()).env("AWS_REGION", "us-east-1")
    }

    /// Asks for `http://169.254.169.254` as an app in a pod does, with
    /// `sidecar` as the HTTP proxy: the sidecar's port-80 listener gets the
    /// request a captured connection would carry (`Host: 169.254.169.254`)
    /// without iptables. botocore's IMDS client honours `HTTP_PROXY`.
    pub fn through_sidecar(self, sidecar: std::net::SocketAddr) -> Self {
        let proxy = format!("http://{sidecar}");
        self.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://169.254.169.254/")
            .env("HTTP_PROXY", &proxy)
            .env("http_proxy", &proxy)
            .env("NO_PROXY", "")
            .env("no_proxy", "")
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.command.env(name, value);
        self
    }

    /// Runs the client and returns the JSON it printed; panics with its
    /// output if it failed.
    pub async fn run(mut self) -> Value {
        let output = tokio::time::timeout(wait::PATIENCE, self.command.output())
            .await
            .unwrap_or_else(|_| panic!("{} took longer than {:?}", self.name, wait::PATIENCE))
            .unwrap_or_else(|e| panic!("run {}: {e}", self.name));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{} failed with {}:\n{stderr}{stdout}", self.name, output.status);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{} printed no JSON ({e}):\n{stdout}", self.name))
    }
}

/// Credentials STS (moto) issued for a role, for a scripted broker to hand
/// the sidecar: what an SDK in the pod should end up holding, and whose
/// STS then says they are (moto recognises the keys it issued).
pub struct IssuedCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// In whole seconds, as the broker and IMDS write it.
    pub expiration: OffsetDateTime,
}

impl IssuedCredentials {
    /// `AssumeRoleWithWebIdentity` for `role_arn` as session `session`,
    /// as the broker asks (plain moto takes any token).
    pub async fn assume(sts: &Sts, role_arn: &str, session: &str) -> Self {
        let reply = sts.assume_role_with_web_identity(role_arn, session, "harness-web-identity-token").await;
        let xml = reply.body_text();
        assert_eq!(reply.status, 200, "{xml}\n{}", sts.log());
        let field = |name| xml_element(&xml, name).unwrap_or_else(|| panic!("no <{name}> in {xml}")).to_owned();
        let expiration = field("Expiration");
        let expiration =
            OffsetDateTime::parse(&expiration, &Rfc3339).unwrap_or_else(|e| panic!("Expiration {expiration}: {e}"));
        Self {
            access_key_id: field("AccessKeyId"),
            secret_access_key: field("SecretAccessKey"),
            session_token: field("SessionToken"),
            expiration: whole_seconds(expiration),
        }
    }

    /// Asserts that `app`, what an SDK app printed (`accessKeyId`,
    /// `secretAccessKey`, `sessionToken`, `expiration`, and the `arn` STS
    /// named when the app called it with them), holds these credentials,
    /// expiring when STS said, and that STS named `arn`.
    pub fn assert_held_by(&self, app: &Value, arn: &str) {
        assert_eq!(app["accessKeyId"], self.access_key_id.as_str(), "{app}");
        assert_eq!(app["secretAccessKey"], self.secret_access_key.as_str());
        assert_eq!(app["sessionToken"], self.session_token.as_str());
        let expiration = app["expiration"].as_str().unwrap_or_else(|| panic!("no expiration: {app}"));
        let expiration =
            OffsetDateTime::parse(expiration, &Rfc3339).unwrap_or_else(|e| panic!("expiration {expiration}: {e}"));
        assert_eq!(expiration, self.expiration);
        assert_eq!(app["arn"], arn, "{app}");
    }

    /// The broker's v1 success carrying these credentials, for every call:
    /// the document the broker itself renders.
    pub fn script(&self) -> impl FnMut(usize) -> Scripted + Send + 'static {
        let credentials = token_broker::sts::Credentials {
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            session_token: self.session_token.clone(),
            expiration: self.expiration,
            last_updated: OffsetDateTime::now_utc(),
        };
        let answer = Scripted {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: token_broker::fetch::credential_document(&credentials).to_string(),
            delay: std::time::Duration::ZERO,
        };
        move |_| answer.clone()
    }
}

fn whole_seconds(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_nanosecond(0).unwrap_or(at)
}
