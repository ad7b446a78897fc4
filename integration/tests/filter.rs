//! The filter in a real Envoy: every behaviour a pod's app can observe.

use std::time::{Duration, Instant};

use imds_filter::config::{ENABLE_LABEL, HttpTokens, ROLE_ANNOTATION};
use integration::broker::access_key_id;
use integration::*;

const ROLE_LIST: &str = "/latest/meta-data/iam/security-credentials/";
/// The filter refreshes when this much life is left (policy::REFRESH_BEFORE_MS).
const REFRESH_BEFORE: Duration = Duration::from_secs(25 * 60);
/// Never served with less than this left (policy::MIN_SERVED_LIFETIME_MS).
const MIN_SERVED_LIFETIME: Duration = Duration::from_secs(60);

async fn hour_broker() -> ScriptedBroker {
    ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n)).await
}

/// Waits until the start-up prefetch has landed: the credential is served.
async fn served_key(envoy: &Envoy) -> String {
    wait::until("a credential to be served", || async {
        let reply = envoy.imds(Req::get(CREDENTIALS_PATH)).await;
        (reply.status == 200).then(|| reply.json()["AccessKeyId"].as_str().unwrap_or_default().to_owned())
    })
    .await
}

// --- 2a: recognising IMDS traffic ---------------------------------------

#[tokio::test]
async fn every_spelling_of_the_imds_authority_is_answered_locally() {
    let broker = hour_broker().await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::sidecar()
        .broker(&broker)
        .upstream(&upstream)
        .config(|c| c.extra_hosts = vec!["metadata.google.internal".into()])
        .start()
        .await;
    for host in
        ["169.254.169.254", "169.254.169.254:80", "[fd00:ec2::254]", "[fd00:ec2::254]:80", "Metadata.Google.Internal"]
    {
        let reply = envoy.imds(Req::get(ROLE_LIST).host(host)).await;
        assert_eq!((reply.status, reply.body_text()), (200, ROLE_NAME.to_owned()), "Host: {host}");
    }
    assert!(upstream.requests().is_empty(), "IMDS traffic reached the upstream");
}

#[tokio::test]
async fn other_traffic_passes_through_byte_for_byte() {
    let broker = hour_broker().await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::sidecar().broker(&broker).upstream(&upstream).start().await;
    let request = Req::put("/latest/meta-data/iam/security-credentials/app?x=%2e%2e")
        .host("169.254.169.254.example.com")
        .header("X-Custom", "kept \t as is")
        .header("x-aws-ec2-metadata-token-ttl-seconds", "60")
        .body(&b"body \x00\xff bytes"[..]);
    let with_filter = envoy.imds(request.clone()).await;
    let without_filter = envoy.plain(request).await;
    assert_eq!(with_filter.status, 200);
    assert_eq!(with_filter.raw, without_filter.raw, "responses differ with the filter");
    assert_eq!(with_filter.body, upstream::BODY);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], seen[1], "the upstream saw a different request with the filter");
    assert!(seen[0].ends_with(b"body \x00\xff bytes"));
    // Where the filter runs on every route (this bootstrap), it counts what
    // it passed on; deployed as rendered it sees none of it.
    envoy.wait_for_stat("imds_mesh.passed_on", 1).await;
}

#[tokio::test]
async fn without_the_filter_the_metadata_address_gets_a_fixed_404_never_the_node() {
    // The route mesh-config renders for the IMDS authorities: if the filter
    // is missing or fails open, the request still never leaves the sidecar.
    let upstream = Upstream::start().await;
    let envoy = Envoy::sidecar().upstream(&upstream).start().await;
    for host in ["169.254.169.254", "169.254.169.254:80", "[fd00:ec2::254]"] {
        let reply = envoy.plain(Req::get(CREDENTIALS_PATH).host(host)).await;
        assert_eq!(reply.status, 404, "Host: {host}: {}", reply.body_text());
    }
    assert!(upstream.requests().is_empty(), "IMDS traffic reached the upstream");
    assert_eq!(envoy.plain(Req::get("/").host("example.com")).await.status, 200, "other traffic still passes");
}

// --- 2b: enablement --------------------------------------------------------

#[tokio::test]
async fn a_pod_that_is_not_enabled_gets_404_and_nothing_leaves_the_sidecar() {
    let broker = hour_broker().await;
    let upstream = Upstream::start().await;
    for pod in [
        Pod::plain(),
        Pod::enabled().label(ENABLE_LABEL, "true"),
        Pod::enabled().label(ENABLE_LABEL, "True "),
        Pod::plain().label(ENABLE_LABEL, "True"),
        Pod::enabled().annotation(ROLE_ANNOTATION, "arn:aws:iam::123456789012:user/app"),
    ] {
        let envoy = Envoy::sidecar().pod(pod.clone()).broker(&broker).upstream(&upstream).start().await;
        for request in [Req::get(ROLE_LIST), Req::get(CREDENTIALS_PATH), Req::token("60")] {
            assert_eq!(envoy.imds(request).await.status, 404, "{pod:?}");
        }
    }
    assert!(upstream.requests().is_empty(), "IMDS traffic reached the upstream");
    assert_eq!(broker.call_count(), 0, "a disabled pod called the broker");
}

#[tokio::test]
async fn the_broker_is_asked_for_the_annotated_role_on_behalf_of_the_pod() {
    let broker = hour_broker().await;
    let role = "arn:aws:iam::123456789012:role/team/data-reader";
    let envoy = Envoy::sidecar().pod(Pod::enabled().annotation(ROLE_ANNOTATION, role)).broker(&broker).start().await;
    let reply = envoy.imds(Req::get(ROLE_LIST)).await;
    assert_eq!(reply.body_text(), "data-reader");
    wait::until("the prefetch", || async { (broker.call_count() > 0).then_some(()) }).await;
    let call = &broker.calls()[0];
    assert_eq!(
        call.query,
        "role_arn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fteam%2Fdata-reader&pod=app-7d9f8b6c5-x2x4q"
    );
    // A name of the role's own under the broker's, for per-role affinity.
    let role = imds_filter::arn::RoleArn::parse(role).unwrap();
    let authority = imds_filter::broker::request_authority(&role, "token-broker.imds-mesh.svc.cluster.local");
    assert!(authority.ends_with(".token-broker.imds-mesh.svc.cluster.local"));
    assert_eq!(call.headers.get("host").and_then(|h| h.to_str().ok()), Some(authority.as_str()));
}

// --- 2c: IMDSv2 tokens -------------------------------------------------------

#[tokio::test]
async fn imdsv2_token_flow_works_and_bad_token_requests_are_refused() {
    let broker = hour_broker().await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    let issued = envoy.imds(Req::token("21600")).await;
    assert_eq!(issued.status, 200);
    assert_eq!(issued.header("content-type"), Some("text/plain"));
    assert_eq!(issued.header("x-aws-ec2-metadata-token-ttl-seconds"), Some("21600"));
    let token = issued.body_text();
    served_key(&envoy).await;
    let reply = envoy.imds(Req::get(CREDENTIALS_PATH).header("X-aws-ec2-metadata-token", &token)).await;
    assert_eq!(reply.status, 200);

    for ttl in ["0", "21601", "sixty", "-5", ""] {
        assert_eq!(envoy.imds(Req::token(ttl)).await.status, 400, "ttl {ttl:?}");
    }
    assert_eq!(envoy.imds(Req::put("/latest/api/token")).await.status, 400, "missing ttl");
    let proxied = Req::token("60").header("X-Forwarded-For", "203.0.113.9");
    assert_eq!(envoy.imds(proxied).await.status, 403);
    // Only /latest issues tokens, as on EC2.
    let dated = Req::put("/2021-03-23/api/token").header("X-aws-ec2-metadata-token-ttl-seconds", "60");
    assert_eq!(envoy.imds(dated).await.status, 403, "token PUT on a dated path");
    // Two TTLs or two tokens are ambiguous, whichever comes first.
    let two_ttls = Req::token("60").header("X-aws-ec2-metadata-token-ttl-seconds", "abc");
    assert_eq!(envoy.imds(two_ttls).await.status, 400, "two TTL headers");
    for pair in [[token.as_str(), "forged"], ["forged", token.as_str()], [token.as_str(), token.as_str()]] {
        let twice = Req::get(CREDENTIALS_PATH)
            .header("X-aws-ec2-metadata-token", pair[0])
            .header("X-aws-ec2-metadata-token", pair[1]);
        assert_eq!(envoy.imds(twice).await.status, 401, "two token headers");
    }

    let mut tampered = token.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    for bad in [String::from_utf8(tampered).unwrap_or_default(), "not-a-token".into(), format!("{token}x")] {
        let reply = envoy.imds(Req::get(CREDENTIALS_PATH).header("X-aws-ec2-metadata-token", &bad)).await;
        assert_eq!(reply.status, 401, "token {bad:?}");
    }
}

#[tokio::test]
async fn a_token_from_another_sidecar_is_refused() {
    let broker = hour_broker().await;
    let first = Envoy::sidecar().broker(&broker).start().await;
    let second = Envoy::sidecar().broker(&broker).start().await;
    let token = first.imds(Req::token("60")).await.body_text();
    let reply = second.imds(Req::get(ROLE_LIST).header("X-aws-ec2-metadata-token", &token)).await;
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn a_token_is_accepted_until_its_ttl_ends_and_refused_after() {
    let broker = hour_broker().await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    // Long enough for a few requests: each takes up to a second here (Envoy
    // closes a `Connection: close` exchange after its delayed-close timeout).
    let ttl = Duration::from_secs(5);
    // The filter stamps the expiry between these two instants.
    let before_issue = Instant::now();
    let token = envoy.imds(Req::token("5")).await.body_text();
    let after_issue = Instant::now();
    let with_token = || Req::get(ROLE_LIST).header("X-aws-ec2-metadata-token", &token);
    let mut accepted = 0;
    loop {
        let sent = Instant::now();
        let status = envoy.imds(with_token()).await.status;
        let answered = Instant::now();
        match status {
            // Checked after `sent`, before an expiry no later than `after_issue + ttl`.
            200 => {
                assert!(sent < after_issue + ttl, "accepted after it expired");
                accepted += 1;
            }
            // Checked before `answered`, at or after an expiry no earlier than `before_issue + ttl`.
            401 => {
                assert!(answered >= before_issue + ttl, "refused {:?} after issue", answered - before_issue);
                break;
            }
            other => panic!("answered {other}"),
        }
        assert!(before_issue.elapsed() < ttl + Duration::from_secs(10), "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted >= 2, "accepted only {accepted} times within its five seconds");
}

#[tokio::test]
async fn tokens_are_valid_on_every_worker() {
    let broker = hour_broker().await;
    let envoy = Envoy::sidecar().broker(&broker).workers(2).start().await;
    served_key(&envoy).await;
    let token = envoy.imds(Req::token("300")).await.body_text();
    // Each request on its own connection, so Envoy spreads them over workers.
    let replies =
        futures_join(40, |_| envoy.imds(Req::get(CREDENTIALS_PATH).header("X-aws-ec2-metadata-token", &token))).await;
    assert!(replies.iter().all(|r| r.status == 200), "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    // Every connection carried one request, all answered 200: each worker
    // that accepted a connection accepted the token.
    let per_worker = worker_connections(&envoy).await;
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert!(per_worker.iter().all(|&n| n > 0), "not every worker answered: {per_worker:?}");
}

/// Connections each worker accepted on the filter's listener (Envoy's
/// `listener.<address>.worker_<n>.downstream_cx_total`).
async fn worker_connections(envoy: &Envoy) -> Vec<u64> {
    let prefix = format!("listener.{}_{}.worker_", envoy.addr.ip(), envoy.addr.port());
    let stats = Req::get("/stats?filter=downstream_cx_total").host("admin").send(envoy.admin_addr).await;
    stats
        .body_text()
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            let worker = name.strip_prefix(&prefix)?.strip_suffix(".downstream_cx_total")?;
            Some((worker.parse::<u32>().ok()?, value.trim().parse().ok()?))
        })
        .collect::<std::collections::BTreeMap<u32, u64>>()
        .into_values()
        .collect()
}

#[tokio::test]
async fn required_tokens_refuse_imdsv1_requests() {
    let broker = hour_broker().await;
    let envoy = Envoy::sidecar().broker(&broker).config(|c| c.http_tokens = HttpTokens::Required).start().await;
    assert_eq!(envoy.imds(Req::get(ROLE_LIST)).await.status, 401);
    assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 401);
    let token = envoy.imds(Req::token("60")).await.body_text();
    let reply = envoy.imds(Req::get(ROLE_LIST).header("X-aws-ec2-metadata-token", &token)).await;
    assert_eq!(reply.status, 200);
}

// --- 2d: routes ------------------------------------------------------------------

#[tokio::test]
async fn only_the_credential_routes_answer_and_everything_else_is_404() {
    let broker = hour_broker().await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::sidecar().broker(&broker).upstream(&upstream).start().await;
    let key = served_key(&envoy).await;
    for path in
        ["/latest/meta-data/iam/security-credentials", ROLE_LIST, "/2016-09-02/meta-data/iam/security-credentials/"]
    {
        let reply = envoy.imds(Req::get(path)).await;
        assert_eq!((reply.status, reply.body_text().as_str()), (200, ROLE_NAME), "{path}");
        assert_eq!(reply.header("content-type"), Some("text/plain"));
    }
    let credentials = envoy.imds(Req::get("/2021-03-23/meta-data/iam/security-credentials/app")).await;
    assert_eq!(credentials.status, 200);
    assert_eq!(credentials.header("content-type"), Some("application/json"));
    let doc = credentials.json();
    assert_eq!(doc["AccessKeyId"], key.as_str());
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    assert!(doc["Expiration"].as_str().is_some_and(|e| e.ends_with('Z')));
    for path in [
        "/",
        "/latest/meta-data/",
        "/latest/meta-data/instance-id",
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/security-credentials-extended/",
        "/latest/meta-data/iam/security-credentials/another-role",
        "/latest/meta-data/iam/security-credentials/app/",
        "/latest/dynamic/instance-identity/document",
        "/latest/user-data",
    ] {
        assert_eq!(envoy.imds(Req::get(path)).await.status, 404, "{path}");
    }
    let head = envoy.imds(Req::new("HEAD", CREDENTIALS_PATH)).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    for method in ["POST", "DELETE", "PATCH"] {
        assert_eq!(envoy.imds(Req::new(method, CREDENTIALS_PATH)).await.status, 405, "{method}");
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn odd_paths_get_a_4xx_never_a_credential_and_never_a_crash() {
    let broker = hour_broker().await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::sidecar().broker(&broker).upstream(&upstream).start().await;
    served_key(&envoy).await;
    let long = format!("/latest/meta-data/{}", "a".repeat(5000));
    let odd: Vec<Vec<u8>> = vec![
        b"/latest/meta-data/iam/x/../security-credentials/app".to_vec(),
        b"/latest//meta-data/iam/security-credentials/app".to_vec(),
        b"/latest/meta-data/iam/security-credentials/%61pp".to_vec(),
        b"/latest/meta-data/iam/security-credentials/app?x=1".to_vec(),
        b"/latest/meta-data/iam/security-credentials/app;x".to_vec(),
        b"/latest/meta-data/iam/security-credentials/./app".to_vec(),
        b"/latest/meta-data/iam/security-credentials/app\x7f".to_vec(),
        b"/latest/meta-data/\xc3\xa9".to_vec(),
        b"*".to_vec(),
        long.into_bytes(),
    ];
    for path in odd {
        let reply = envoy.imds(Req::get(path.clone())).await;
        assert!((400..500).contains(&reply.status), "{:?} answered {}", String::from_utf8_lossy(&path), reply.status);
    }
    assert!(upstream.requests().is_empty());
    // The VM is alive and well after all that.
    assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 200);
    assert!(!envoy.log().contains("panicked"), "the filter panicked");
}

// --- 2e: credentials and the cache ------------------------------------------------

#[tokio::test]
async fn credentials_are_prefetched_before_the_first_request() {
    let broker = hour_broker().await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    envoy.wait_for_stat("imds_mesh.broker_fetches.success", 1).await;
    // The first app request finds the credential already there.
    assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 200);
    let hits = wait::until("stats", || async {
        let hits = envoy.stat("imds_mesh.cache.hits").await;
        (hits > 0).then_some(hits)
    })
    .await;
    assert!(hits >= 1);
    assert_eq!(broker.call_count(), 1);
}

#[tokio::test]
async fn concurrent_first_requests_on_two_workers_cause_one_broker_call() {
    let broker =
        ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n).delayed(Duration::from_millis(300))).await;
    let envoy = Envoy::sidecar().broker(&broker).workers(2).config(|c| c.max_wait_ms = 950).start().await;
    let replies = futures_join(24, |_| envoy.imds(Req::get(CREDENTIALS_PATH))).await;
    let keys: Vec<String> = replies
        .iter()
        .map(|r| if r.status == 200 { r.json()["AccessKeyId"].to_string() } else { r.status.to_string() })
        .collect();
    assert!(keys.iter().all(|k| *k == format!("\"{}\"", access_key_id(0))), "{keys:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(broker.call_count(), 1, "one fetch for all workers and requests");
}

#[tokio::test]
async fn a_warm_cache_keeps_serving_while_the_broker_is_down() {
    // Credentials due for refresh two seconds after they arrive.
    let lifetime = REFRESH_BEFORE + Duration::from_secs(2);
    let broker = ScriptedBroker::start(move |n| Scripted::credentials_for(lifetime, n)).await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    let key = served_key(&envoy).await;
    drop(broker); // connection refused from now on
    envoy.wait_for_stat("imds_mesh.broker_fetches.unavailable", 1).await;
    assert_eq!(served_key(&envoy).await, key);
}

#[tokio::test]
async fn a_warm_cache_keeps_serving_while_the_broker_times_out() {
    let lifetime = REFRESH_BEFORE + Duration::from_secs(2);
    let broker = ScriptedBroker::start(move |n| {
        let scripted = Scripted::credentials_for(lifetime, n);
        if n == 0 { scripted } else { scripted.delayed(Duration::from_secs(5)) }
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).config(|c| c.broker_timeout_ms = 300).start().await;
    let key = served_key(&envoy).await;
    envoy.wait_for_stat("imds_mesh.broker_fetches.timeout", 1).await;
    assert_eq!(served_key(&envoy).await, key);
}

#[tokio::test]
async fn an_expired_credential_is_never_served() {
    // Served for three seconds, then inside the no-serve window.
    let lifetime = MIN_SERVED_LIFETIME + Duration::from_secs(3);
    let broker = ScriptedBroker::start(move |n| {
        if n == 0 { Scripted::credentials_for(lifetime, n) } else { Scripted::error(503, "Unavailable", "down") }
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    let first = envoy.imds(Req::get(CREDENTIALS_PATH)).await;
    let received = Instant::now();
    let withdrawn = wait::until("the credential to be withdrawn", || async {
        let reply = envoy.imds(Req::get(CREDENTIALS_PATH)).await;
        (reply.status != 200).then_some(reply)
    })
    .await;
    assert!(first.status == 200 || received.elapsed() > Duration::from_secs(3));
    assert_eq!(withdrawn.status, 503);
    // Once withdrawn it stays withdrawn: nothing serves the old credential.
    for _ in 0..5 {
        assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 503);
    }
}

#[tokio::test]
async fn credentials_are_refreshed_before_expiry_without_any_request() {
    let lifetime = REFRESH_BEFORE + Duration::from_secs(2);
    let broker =
        ScriptedBroker::start(move |n| Scripted::credentials_for(if n == 0 { lifetime } else { HOUR }, n)).await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    wait::until("a refresh with no app request", || async { (broker.call_count() >= 2).then_some(()) }).await;
    let calls = broker.calls();
    assert!(calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(1500), "refreshed too early");
    wait::until("the refreshed credential to be served", || async {
        (served_key(&envoy).await == access_key_id(1)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_denial_is_answered_404_and_remembered() {
    let broker =
        ScriptedBroker::start(|_| Scripted::error(403, "AccessDenied", "pod is not annotated with that role")).await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    wait::until("the denial", || async { (broker.call_count() == 1).then_some(()) }).await;
    for _ in 0..5 {
        assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 404);
    }
    assert_eq!(broker.call_count(), 1, "a denial is not retried at once");
    assert!(envoy.log().contains("AccessDenied"), "the denial is logged");
}

#[tokio::test]
async fn a_denial_withdraws_a_cached_credential_at_once() {
    // Due for refresh two seconds after it arrives; the refresh is denied.
    let lifetime = REFRESH_BEFORE + Duration::from_secs(2);
    let broker = ScriptedBroker::start(move |n| {
        if n == 0 {
            Scripted::credentials_for(lifetime, n)
        } else {
            Scripted::error(403, "AccessDenied", "pod no longer carries the annotation")
        }
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    served_key(&envoy).await;
    wait::until("the denied refresh", || async { (broker.call_count() >= 2).then_some(()) }).await;
    // Every worker drops it within its next tick (a second), with 25
    // minutes of life left on it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..10 {
        assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 404, "a denied credential was served");
    }
}

#[tokio::test]
async fn a_credential_expiring_later_than_sts_issues_is_not_served() {
    let broker = ScriptedBroker::start(|n| {
        let mut scripted = Scripted::credentials_for(HOUR, n);
        let mut doc: serde_json::Value = serde_json::from_str(&scripted.body).unwrap();
        doc["Expiration"] = "9999-12-31T23:59:59Z".into();
        scripted.body = doc.to_string();
        scripted
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    envoy.wait_for_stat("imds_mesh.broker_fetches.malformed", 1).await;
    assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 503);
}

#[tokio::test]
async fn an_unknown_pod_is_retried_soon() {
    let broker = ScriptedBroker::start(|n| {
        if n < 2 {
            Scripted::error(404, "PodNotFound", "not in the informer yet")
        } else {
            Scripted::credentials_for(HOUR, n)
        }
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    assert_eq!(served_key(&envoy).await, access_key_id(2));
}

#[tokio::test]
async fn throttling_is_retried_no_sooner_than_retry_after() {
    let broker = ScriptedBroker::start(|n| {
        if n == 0 {
            Scripted::error(429, "Throttled", "slow down").header("retry-after", "2")
        } else {
            Scripted::credentials_for(HOUR, n)
        }
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    assert_eq!(served_key(&envoy).await, access_key_id(1));
    let calls = broker.calls();
    assert!(calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(1900), "Retry-After not honoured");
}

#[tokio::test]
async fn an_unusable_broker_answer_is_not_served() {
    let broker = ScriptedBroker::start(|_| Scripted {
        status: 200,
        headers: vec![],
        body: r#"{"Code":"Success","Type":"AWS-HMAC"}"#.into(),
        delay: Duration::ZERO,
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    envoy.wait_for_stat("imds_mesh.broker_fetches.malformed", 1).await;
    assert_eq!(envoy.imds(Req::get(CREDENTIALS_PATH)).await.status, 503);
}

#[tokio::test]
async fn a_held_request_with_a_body_is_answered_here_and_never_goes_upstream() {
    // The start-up fetch hangs, so every credential request is held for the
    // whole wait, and its body and trailers arrive while it is held. (Envoy's
    // wasm host already stops the whole stream at a paused header callback;
    // the filter's body and trailer callbacks pause as well.)
    let broker = ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n).delayed(Duration::from_secs(30))).await;
    let upstream = Upstream::start().await;
    // A host the route table sends to the upstream, were it not answered here.
    let host = "metadata.google.internal";
    let envoy = Envoy::sidecar()
        .broker(&broker)
        .upstream(&upstream)
        .config(|c| {
            c.extra_hosts = vec![host.into()];
            c.broker_timeout_ms = 30_000;
        })
        .start()
        .await;
    let body = &b"held body"[..];
    let with_length = Req::get(CREDENTIALS_PATH).host(host).body(body);
    let chunked = Req::get(CREDENTIALS_PATH).host(host).body(body).chunked(&[("x-trailer", "held")]);
    for (name, request) in [("content-length", with_length), ("chunked with trailers", chunked)] {
        let reply = envoy.imds(request).await;
        // The filter's own answer once the wait ran out.
        assert_eq!((reply.status, reply.body_text().as_str()), (503, "Service Unavailable"), "{name}");
    }
    let h2 = clients::SdkClient::node("h2_request.mjs", &envoy)
        .env("H2_AUTHORITY", host)
        .env("H2_METHOD", "GET")
        .env("H2_PATH", CREDENTIALS_PATH)
        .env("H2_BODY", "held body")
        .run()
        .await;
    assert_eq!((h2["status"].as_u64(), h2["body"].as_str()), (Some(503), Some("Service Unavailable")), "HTTP/2: {h2}");
    assert!(upstream.requests().is_empty(), "a held request went upstream");
    envoy.wait_for_stat("imds_mesh.requests.credentials.5xx", 3).await;
    assert!(!envoy.log().contains("panicked"), "the filter panicked");
}

// --- 2f: configuration ----------------------------------------------------------

#[tokio::test]
async fn invalid_plugin_config_makes_envoy_reject_the_filter() {
    for (config, field) in [
        (serde_json::json!({ "broker_clustr": "x" }), "broker_clustr"),
        (serde_json::json!({ "http_tokens": "always" }), "always"),
        (serde_json::json!({ "max_wait_ms": 5000 }), "max_wait_ms"),
    ] {
        let output = Envoy::sidecar().raw_config(config).start_expecting_failure().await;
        assert!(output.contains("invalid pluginConfig"), "{output}");
        assert!(output.contains(field), "the error names {field}: {output}");
    }
}

// --- 2g: metrics -------------------------------------------------------------------

#[tokio::test]
async fn requests_tokens_cache_and_fetches_are_counted_in_envoy_stats() {
    let broker = hour_broker().await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    served_key(&envoy).await;
    let token = envoy.imds(Req::token("60")).await.body_text();
    envoy.imds(Req::get(CREDENTIALS_PATH).header("X-aws-ec2-metadata-token", &token)).await;
    envoy.imds(Req::get("/latest/meta-data/instance-id")).await;
    envoy.imds(Req::token("0")).await;
    let stats = wait::until("stats to be flushed", || async {
        let stats = envoy.stats().await;
        (stats.get("imds_mesh.requests.other.4xx") == Some(&1)).then_some(stats)
    })
    .await;
    assert!(stats["imds_mesh.requests.credentials.2xx"] >= 2);
    assert_eq!(stats["imds_mesh.requests.token.2xx"], 1);
    assert_eq!(stats["imds_mesh.requests.token.4xx"], 1);
    assert_eq!(stats["imds_mesh.tokens.issued"], 1);
    assert_eq!(stats["imds_mesh.tokens.rejected"], 1);
    assert!(stats["imds_mesh.cache.hits"] >= 1);
    assert_eq!(stats["imds_mesh.broker_fetches.success"], 1);
}

// --- secrets -----------------------------------------------------------------------

#[tokio::test]
async fn no_key_secret_or_token_reaches_the_envoy_log() {
    let broker = ScriptedBroker::start(|n| match n {
        0 => Scripted::error(503, "Unavailable", "warming up"),
        _ => Scripted::credentials_for(REFRESH_BEFORE + Duration::from_secs(2), n),
    })
    .await;
    let envoy = Envoy::sidecar().broker(&broker).start().await;
    let token = envoy.imds(Req::token("60")).await.body_text();
    let key = served_key(&envoy).await;
    envoy.imds(Req::get(CREDENTIALS_PATH).header("X-aws-ec2-metadata-token", &token)).await;
    envoy.imds(Req::get(CREDENTIALS_PATH).header("X-aws-ec2-metadata-token", &format!("{token}x"))).await;
    wait::until("a refresh", || async { (broker.call_count() >= 3).then_some(()) }).await;
    let log = envoy.log();
    assert!(log.contains("credentials for arn:aws:iam::123456789012:role/app"), "the run logged nothing useful");
    for secret in [token.as_str(), key.as_str(), "harness-secret-", "harness-session-token-"] {
        assert!(!log.contains(secret), "the log contains {secret:?}");
    }
}

/// Runs `n` requests concurrently, each on its own connection.
async fn futures_join<'a, F, Fut>(n: usize, make: F) -> Vec<Reply>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Reply> + 'a,
{
    let mut set = Vec::with_capacity(n);
    for i in 0..n {
        set.push(make(i));
    }
    join_all(set).await
}

async fn join_all<Fut: std::future::Future<Output = Reply>>(futures: Vec<Fut>) -> Vec<Reply> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<Reply>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, fut) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(reply) => out[i] = Some(reply),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

// --- 2a, by original destination ---------------------------------------------------

/// GETs `url` with `Host: host` from inside `netns`.
fn get_in(netns: &integration::netns::NetNs, url: &str, host: &str) -> serde_json::Value {
    let script = integration::paths::repo_root().join("integration/clients/http_get.py");
    let output = netns.command(integration::paths::python()).arg(script).args([url, host]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn a_spoofed_host_sent_to_the_metadata_address_is_still_answered_locally() {
    let Some(netns) = integration::netns::NetNs::create(&["169.254.169.254/32"]) else {
        panic!("this test needs root to create a network namespace (CI and `just test` run as root)");
    };
    let broker = hour_broker().await;
    let envoy = Envoy::sidecar().broker(&broker).start_in(&netns, "0.0.0.0:80".parse().unwrap());
    // The app connects to the metadata address but names another host.
    let spoofed = get_in(&netns, "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "example.com");
    assert_eq!((spoofed["status"].as_u64(), spoofed["body"].as_str()), (Some(200), Some(ROLE_NAME)), "{spoofed}");
    // The same request to any other address is not IMDS: it goes upstream
    // (here there is none, so Envoy answers 503).
    let elsewhere = get_in(&netns, "http://127.0.0.1:80/latest/meta-data/iam/security-credentials/", "example.com");
    assert_eq!(elsewhere["status"].as_u64(), Some(503), "{elsewhere}");
    drop(envoy);
}

#[tokio::test]
async fn without_the_filter_a_spoofed_host_to_the_metadata_address_is_refused_by_destination() {
    let Some(netns) = integration::netns::NetNs::create(&["169.254.169.254/32"]) else {
        panic!("this test needs root to create a network namespace (CI and `just test` run as root)");
    };
    // A pod the WasmPlugin does not select: only the mesh's guard stands
    // between it and the node's metadata service.
    let envoy = Envoy::sidecar().without_filter().start_in(&netns, "0.0.0.0:80".parse().unwrap());
    // Refused by destination, whatever the Host says.
    let spoofed = get_in(&netns, "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "example.com");
    assert_eq!(spoofed["status"].as_u64(), Some(403), "{spoofed}");
    let named = get_in(&netns, "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "169.254.169.254");
    assert_eq!(named["status"].as_u64(), Some(403), "{named}");
    // Any other destination still passes through (no upstream here: 503).
    let elsewhere = get_in(&netns, "http://127.0.0.1:80/latest/meta-data/iam/security-credentials/", "example.com");
    assert_eq!(elsewhere["status"].as_u64(), Some(503), "{elsewhere}");
    drop(envoy);
}
