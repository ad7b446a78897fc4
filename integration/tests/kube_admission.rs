//! The token audience policy (`mesh-config render
//! --restrict-token-audience`) on a real Kubernetes API server: applied for
//! real, once in force it refuses the broker's service account a token for
//! any audience but `sts.amazonaws.com`, with the policy's message; grants
//! it that one; leaves everyone else's TokenRequests alone; and the real
//! broker still gets STS credentials under it.
//!
//! What the server showed: a TokenRequest naming no audience reaches
//! validating admission with the server's own audience already filled in
//! (the refusal's message names it), so it is refused too.

use integration::kube_cluster::{BROKER_USER, ISSUER, KubeCluster};
use integration::real_broker::dev_credentials_request;
use integration::{ROLE_ARN, RealBroker, Sts, wait};
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::core::Status;
use mesh_config::render::{self, Object, Options, TOKEN_AUDIENCE, TOKEN_AUDIENCE_POLICY};
use token_broker::app;

fn restricted() -> Options {
    Options { restrict_token_audience: true, ..Options::default() }
}

/// The rendered policy and its binding.
fn policy_objects(options: &Options) -> Vec<serde_json::Value> {
    render::render(options)
        .iter()
        .filter(|o| matches!(o, Object::ValidatingAdmissionPolicy(_) | Object::ValidatingAdmissionPolicyBinding(_)))
        .map(|o| serde_json::to_value(o).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Asks for a token of service account `default/app` for `audiences`.
async fn token_for(accounts: &Api<ServiceAccount>, audiences: &[&str]) -> Result<String, Box<Status>> {
    let request = TokenRequest {
        spec: TokenRequestSpec { audiences: audiences.iter().map(|a| (*a).to_owned()).collect(), ..Default::default() },
        ..TokenRequest::default()
    };
    match accounts.create_token_request("app", &PostParams::default(), &request).await {
        Ok(issued) => Ok(issued.status.map(|s| s.token).unwrap_or_default()),
        Err(kube::Error::Api(status)) => Err(status),
        Err(e) => panic!("TokenRequest: {e}"),
    }
}

/// Policies take effect asynchronously: waits until the server refuses
/// the broker (`accounts`, as the broker) a token for another audience,
/// and returns that refusal.
async fn until_in_force(accounts: &Api<ServiceAccount>) -> Box<Status> {
    wait::until("the token audience policy to be in force", || async { token_for(accounts, &["vault"]).await.err() })
        .await
}

/// Who the API server takes the bearer of `token` for (a
/// SelfSubjectReview), or the status it refused it with.
async fn who_am_i(cluster: &KubeCluster, token: &str) -> Result<String, u16> {
    let client = kube::Client::try_from(cluster.config(token)).unwrap_or_else(|e| panic!("{e}"));
    match Api::<SelfSubjectReview>::all(client).create(&PostParams::default(), &SelfSubjectReview::default()).await {
        Ok(review) => Ok(review.status.and_then(|s| s.user_info).and_then(|u| u.username).unwrap_or_default()),
        Err(kube::Error::Api(status)) => Err(status.code),
        Err(e) => panic!("SelfSubjectReview: {e}"),
    }
}

/// The message of a refusal by the policy.
fn denied(asked_for: &str) -> String {
    format!(
        "serviceaccounts \"app\" is forbidden: ValidatingAdmissionPolicy '{TOKEN_AUDIENCE_POLICY}' with binding \
         '{TOKEN_AUDIENCE_POLICY}' denied request: the token broker may request service-account tokens only for the \
         audience sts.amazonaws.com; this request asked for [{asked_for}]"
    )
}

#[tokio::test]
async fn the_broker_may_request_tokens_only_for_sts_and_everyone_else_is_left_alone() {
    let cluster = KubeCluster::start().await;
    let options = restricted();
    cluster.service_account("default", "app").await;
    let broker = kube::Client::try_from(cluster.broker_config(&options).await).unwrap_or_else(|e| panic!("{e}"));
    let as_broker = Api::<ServiceAccount>::namespaced(broker, "default");
    let as_admin = Api::<ServiceAccount>::namespaced(cluster.admin(), "default");

    // The rendered RBAC alone lets the broker mint a token any service
    // account would use at the API server.
    let token = token_for(&as_broker, &[ISSUER]).await.unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(who_am_i(&cluster, &token).await, Ok("system:serviceaccount:default:app".to_owned()));

    cluster.apply(&policy_objects(&options)).await;
    let refused = until_in_force(&as_broker).await;
    assert_eq!((refused.code, refused.reason.as_str()), (403, "Forbidden"), "{refused:?}");
    assert_eq!(refused.message, denied("vault"));

    // The API server's own audience, explicitly or by default: admission
    // sees the default filled in.
    assert_eq!(token_for(&as_broker, &[ISSUER]).await.unwrap_err().message, denied(ISSUER));
    assert_eq!(token_for(&as_broker, &[]).await.unwrap_err().message, denied(ISSUER));
    // STS's audience, but not alone.
    let both = token_for(&as_broker, &[TOKEN_AUDIENCE, "vault"]).await.unwrap_err();
    assert_eq!(both.message, denied("sts.amazonaws.com, vault"));

    // STS's audience alone is granted; that token is no good at the API
    // server.
    let sts_token = token_for(&as_broker, &[TOKEN_AUDIENCE]).await.unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(who_am_i(&cluster, &sts_token).await, Err(401));

    // Only the broker is bound: the admin gets any audience.
    assert!(token_for(&as_admin, &["vault"]).await.is_ok());
    assert!(token_for(&as_admin, &[]).await.is_ok());

    // The server refused the broker these four requests and nothing else.
    assert_eq!(cluster.refusals(BROKER_USER), vec!["create serviceaccounts/token"; 4]);
}

#[tokio::test]
async fn the_real_broker_gets_sts_credentials_with_the_policy_in_force() {
    // What the policy allows is what the broker asks for by default.
    assert_eq!(TOKEN_AUDIENCE, app::DEFAULT_TOKEN_AUDIENCE);
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let options = restricted();
    cluster.add_pod(integration::kube_cluster::enabled_pod("default", "app-0", "app", ROLE_ARN)).await;
    let config = cluster.broker_config(&options).await;
    cluster.apply(&policy_objects(&options)).await;
    let as_broker = Api::<ServiceAccount>::namespaced(
        kube::Client::try_from(config.clone()).unwrap_or_else(|e| panic!("{e}")),
        "default",
    );
    until_in_force(&as_broker).await;
    let refused_before = cluster.refusals(BROKER_USER).len();

    let broker = RealBroker::with_kube(config, sts.endpoint()).start().await;
    let reply = dev_credentials_request("default", "app", ROLE_ARN, "app-0").send(broker.addr).await;
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert_eq!(sts.seen().accepted.len(), 1, "{:?}", sts.seen());
    // The broker's own TokenRequest (bound to the pod) passed the policy.
    assert_eq!(cluster.refusals(BROKER_USER).len(), refused_before);
    let granted = cluster.token_requests(BROKER_USER);
    let last = granted.last().unwrap_or_else(|| panic!("no TokenRequest granted"));
    assert_eq!(last.audiences, [TOKEN_AUDIENCE]);
    assert!(last.bound_object_ref.is_some(), "{last:?}");
}
