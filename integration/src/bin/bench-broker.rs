//! `bench-broker`: what the token broker's cache buys, measured against the
//! real service (`token_broker::server::run`) in this process, over loopback,
//! with a real Kubernetes API server (the broker as its own service account,
//! with the rendered RBAC) and a scripted STS.
//!
//! Two parts, on one broker:
//! - cold start: 200 concurrent first requests, spread evenly over 5 pods
//!   that run as 5 service accounts with 5 roles (5 cache keys), each
//!   request for its own pod. Single flight means exactly one TokenRequest
//!   and one STS call per key: 5 and 5. STS holds each answer
//!   [`STS_DELAY`], so later requests arrive while the first fetch of their
//!   key is still in flight.
//! - cached hits: `wrk` keep-alive load on `GET /v1/credentials` for one pod
//!   whose credential is warm (case c), against `GET /healthz` (case h): a
//!   trivial handler in the same axum router, so the same listener, hyper
//!   connection and runtime, the baseline for c. Both cases send the same
//!   `insecure-dev` identity headers, so the requests differ only in their
//!   path.
//!
//! Reading the output: the cold-start counts with PASS/MISS; then one line
//! per round with req/s and p99 per case, the median per case over the
//! rounds, and the median of the per-round `c/h` req/s ratios against 0.8.
//! PASS/MISS are information, not a verdict: the exit code is 0 whenever
//! the benchmark ran. Last, the TokenRequest and STS counts again: still 5
//! after the load means every c request was a cache hit. The figures are
//! those of the build `cargo run` made (the header says which profile).
//!
//! Usage: `just bench-broker`, or
//! `cargo run -p integration --bin bench-broker -- [--workers N] [--rounds N]
//! [--duration SECS] [--connections N]`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use integration::bench::{self, Options, Sample, WARM_UP_SECS, WRK_THREADS, Wrk, load_average, nproc, verdict};
use integration::broker::Scripted;
use integration::kube_cluster::{self, BROKER_USER, KubeCluster};
use integration::{RealBroker, Req, ScriptedSts};
use k8s_openapi::api::core::v1::Pod;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use token_broker::server::{DEV_NAMESPACE_HEADER, DEV_SERVICE_ACCOUNT_HEADER};

/// `c/h` req/s target: a cached credential vs the trivial handler.
const HIT_TARGET: f64 = 0.80;
/// Concurrent first requests in the cold start.
const COLD_REQUESTS: usize = 200;
/// Cache keys (pods, each with its own service account and role) they
/// spread over; also the target for TokenRequests and STS calls.
const COLD_KEYS: usize = 5;
/// How long the scripted STS holds each answer: long against loopback
/// round trips, so the 200 requests overlap the first fetch of their key;
/// short, so the cold start takes well under a second.
const STS_DELAY: Duration = Duration::from_millis(250);
const NAMESPACE: &str = "default";
/// The pod (key 0) whose warm credential the hit case asks for.
const HIT_KEY: usize = 0;
/// Case indices, in [`Bench::cases`] order.
const H: usize = 0;
const C: usize = 1;

fn main() -> ExitCode {
    let options = match Options::from_args("bench-broker") {
        Ok(options) => options,
        Err(code) => return code,
    };
    // Built by hand rather than with `#[tokio::main]`: the worker count is
    // an option.
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(options.workers as usize).enable_all().build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("bench-broker: tokio runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("bench-broker: {problem}");
            ExitCode::FAILURE
        }
    }
}

/// One load to measure.
struct Case {
    key: &'static str,
    what: &'static str,
    path: String,
}

/// Everything the benchmark runs against, started once.
struct Bench {
    kube: KubeCluster,
    sts: ScriptedSts,
    broker: RealBroker,
    cases: [Case; 2],
    wrk: Wrk,
}

async fn run(options: Options) -> Result<(), String> {
    let wrk_version = bench::wrk_version().await.ok_or("`wrk` is not installed: run scripts/setup-system.sh")?;
    let bench = Bench::start().await?;
    let load = options.load();

    println!("imds-mesh token broker benchmark");
    println!(
        "  broker       token_broker::server::run in this process, {} build, identity insecure-dev",
        if cfg!(debug_assertions) { "debug (dev profile)" } else { "release" }
    );
    println!(
        "  runtime      tokio multi-thread, {} worker thread(s) (--workers), shared with the scripted STS; \
         kube-apiserver and etcd in processes of their own",
        options.workers
    );
    println!(
        "  wrk          {wrk_version}; -t{WRK_THREADS} -c{} -d{}s --latency, keep-alive",
        load.connections, load.secs
    );
    println!(
        "  rounds       {}: h c, then c h, and so on; {WARM_UP_SECS}s unmeasured warm-up per case first",
        options.rounds
    );
    println!(
        "  cold start   {COLD_REQUESTS} concurrent first requests over {COLD_KEYS} keys; STS answers after {} ms",
        STS_DELAY.as_millis()
    );
    println!("  nproc        {}", nproc().await);
    println!("  load avg     {} (before)", load_average());
    println!();

    bench.cold_start().await?;
    bench.check_cases().await?;

    let keys = bench.cases.each_ref().map(|case| case.key);
    let samples =
        bench::measure(keys, schedule, options.rounds, load, 6, async |i, load| bench.wrk(&bench.cases[i], load).await)
            .await?
            .rounds;

    bench::print_cases(bench.cases.iter().map(|case| (case.key, case.what)), &samples);
    print_target(&samples);

    let (tokens, sts_calls) = (bench.kube.token_requests(BROKER_USER).len(), bench.sts.request_count());
    let verdict =
        if tokens == COLD_KEYS && sts_calls == COLD_KEYS { "c was served from cache" } else { "NOT all from cache" };
    println!("after load   TokenRequests {tokens}, STS calls {sts_calls} (still {COLD_KEYS}?): {verdict}");
    println!("metrics      {}", bench.cache_metrics().await);
    println!("load avg     {} (after)", load_average());
    Ok(())
}

impl Bench {
    /// Starts the API server with [`COLD_KEYS`] pods, the scripted STS and
    /// the broker, and waits until the broker is ready.
    async fn start() -> Result<Self, String> {
        let kube = KubeCluster::start().await;
        for key in 0..COLD_KEYS {
            kube.add_pod(pod(key)).await;
        }
        // Call n gets access key n, so the replies show which fetch they
        // came from.
        let sts = ScriptedSts::start(|call| sts_success(call, STS_DELAY)).await;

        // The same service the broker tests run (insecure-dev identity),
        // ready once its pod watch has synced.
        let broker = RealBroker::on(&kube, sts.endpoint()).await.start().await;

        let wrk = Wrk::new()?;
        let cases = [
            Case { key: "h", what: "GET /healthz (same router, trivial)", path: "/healthz".to_owned() },
            Case { key: "c", what: "GET /v1/credentials, cached", path: credentials_path(HIT_KEY) },
        ];
        Ok(Self { kube, sts, broker, cases, wrk })
    }

    /// Sends [`COLD_REQUESTS`] first requests at once, request `i` for pod
    /// `i % COLD_KEYS`, and prints the TokenRequests and STS calls they
    /// caused.
    async fn cold_start(&self) -> Result<(), String> {
        let addr = self.broker.addr;
        let started = Instant::now();
        let requests =
            (0..COLD_REQUESTS).map(|i| async move { (i % COLD_KEYS, dev_request(i % COLD_KEYS).send(addr).await) });
        let replies = futures_util::future::join_all(requests).await;
        let elapsed = started.elapsed();

        let mut statuses = BTreeMap::<u16, usize>::new();
        let mut keys_per_pod = vec![BTreeSet::new(); COLD_KEYS];
        for (key, reply) in &replies {
            *statuses.entry(reply.status).or_default() += 1;
            if reply.status == 200
                && let Some(id) = reply.json()["AccessKeyId"].as_str()
            {
                keys_per_pod[*key].insert(id.to_owned());
            }
        }
        let tokens = self.kube.token_requests(BROKER_USER).len();
        let sts_calls = self.sts.request_count();
        let statuses: Vec<String> = statuses.iter().map(|(status, n)| format!("{n} x {status}")).collect();
        // One access key per pod, each pod its own: every reply for a key
        // came from that key's one fetch.
        let distinct: BTreeSet<&String> = keys_per_pod.iter().flatten().collect();
        let one_each = keys_per_pod.iter().all(|ids| ids.len() == 1) && distinct.len() == COLD_KEYS;
        println!(
            "cold start   {COLD_REQUESTS} requests in {} ms: {}; access keys per pod {:?}: {}",
            elapsed.as_millis(),
            statuses.join(", "),
            keys_per_pod.iter().map(BTreeSet::len).collect::<Vec<_>>(),
            if one_each { "one each, all distinct" } else { "NOT one per key" }
        );
        println!("{:<42} {:>9} {:>10}", "target", "measured", "goal");
        for (what, count) in
            [("TokenRequests (Kubernetes API)", tokens), ("STS AssumeRoleWithWebIdentity calls", sts_calls)]
        {
            println!("{what:<42} {count:>9} {:>10} {}", format!("== {COLD_KEYS}"), verdict(count == COLD_KEYS));
        }
        println!("metrics      {}", self.cache_metrics().await);
        println!();
        Ok(())
    }

    /// Checks that both cases answer 200, the hit case with a credential.
    async fn check_cases(&self) -> Result<(), String> {
        for case in &self.cases {
            let reply = with_identity(Req::get(case.path.as_str()), HIT_KEY).send(self.broker.addr).await;
            if reply.status != 200 {
                return Err(format!("case {} answers {}: {}", case.key, reply.status, reply.body_text()));
            }
            if case.key == "c" && reply.json()["AccessKeyId"].as_str().is_none() {
                return Err(format!("case c answers no credential: {}", reply.body_text()));
            }
        }
        Ok(())
    }

    /// The broker's cache and STS counters from `/metrics`.
    async fn cache_metrics(&self) -> String {
        let text = Req::get("/metrics").host("token-broker").send(self.broker.addr).await.body_text();
        let wanted =
            ["token_broker_cache_hits_total", "token_broker_cache_misses_total", "token_broker_sts_calls_total"];
        text.lines()
            .filter(|line| wanted.iter().any(|name| line.split_whitespace().next() == Some(*name)))
            .map(|line| line.trim_start_matches("token_broker_"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Runs wrk once against `case`, as the caller pod [`HIT_KEY`] runs as.
    async fn wrk(&self, case: &Case, load: bench::Load) -> Result<Sample, String> {
        let identity =
            [format!("{DEV_NAMESPACE_HEADER}: {NAMESPACE}"), format!("{DEV_SERVICE_ACCOUNT_HEADER}: bench-{HIT_KEY}")];
        self.wrk.run(&format!("http://{}{}", self.broker.addr, case.path), &identity, load).await
    }
}

/// Pod `key`: `bench-{key}` in [`NAMESPACE`], running as service account
/// `bench-{key}`, opted in and annotated with role `bench-{key}`.
fn pod(key: usize) -> Pod {
    let name = format!("bench-{key}");
    kube_cluster::enabled_pod(NAMESPACE, &name, &name, &role_arn(key))
}

fn role_arn(key: usize) -> String {
    format!("arn:aws:iam::123456789012:role/bench-{key}")
}

/// `/v1/credentials` for pod `key` and its role, query-encoded.
fn credentials_path(key: usize) -> String {
    let encoded = role_arn(key).replace(':', "%3A").replace('/', "%2F");
    format!("/v1/credentials?role_arn={encoded}&pod=bench-{key}")
}

/// `req` from the `insecure-dev` caller that pod `key` runs as.
fn with_identity(req: Req, key: usize) -> Req {
    req.host("token-broker")
        .header(DEV_NAMESPACE_HEADER, NAMESPACE)
        .header(DEV_SERVICE_ACCOUNT_HEADER, &format!("bench-{key}"))
}

/// Pod `key`'s own credential request.
fn dev_request(key: usize) -> Req {
    with_identity(Req::get(credentials_path(key)), key)
}

/// A successful `AssumeRoleWithWebIdentity` answer as STS writes it, with
/// access key `ASIABENCH…{call}`, after `delay`.
fn sts_success(call: usize, delay: Duration) -> Scripted {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc());
    let expiration = (now + Duration::from_secs(3600)).format(&Rfc3339).unwrap_or_default();
    let body = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <AssumeRoleWithWebIdentityResult>\
         <Credentials><AccessKeyId>ASIABENCH{call:010}</AccessKeyId>\
         <SecretAccessKey>bench-secret-access-key-{call}</SecretAccessKey>\
         <SessionToken>bench-session-token-{call}</SessionToken>\
         <Expiration>{expiration}</Expiration></Credentials>\
         <AssumedRoleUser><AssumedRoleId>AROA:bench</AssumedRoleId>\
         <Arn>arn:aws:sts::123456789012:assumed-role/bench/bench</Arn></AssumedRoleUser>\
         </AssumeRoleWithWebIdentityResult>\
         <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>\
         </AssumeRoleWithWebIdentityResponse>"
    );
    Scripted { status: 200, headers: vec![("content-type".into(), "text/xml".into())], body, delay }
}

/// The order of the cases in `round`: h c, then c h (ABBA), so each goes
/// first in half the rounds and a per-round ratio compares runs seconds
/// apart.
fn schedule(round: usize) -> [usize; 2] {
    if round.is_multiple_of(2) { [H, C] } else { [C, H] }
}

/// The target: the median of the per-round `c/h` req/s ratios.
fn print_target(samples: &[Vec<Sample>; 2]) {
    bench::print_targets_heading();
    bench::print_ratio_target(
        "c/h req/s (cached hit vs /healthz)",
        bench::ratios(samples, C, H, |s| s.rps),
        HIT_TARGET,
    );
    let p99 = bench::median(bench::ratios(samples, C, H, |s| s.p99_us).into_iter());
    println!("{:<42} {:>9}", "p99 c/h (no target; lower is better)", format!("{p99:.2}"));
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hit_case_and_its_baseline_take_turns_going_first() {
        for round in 0..4 {
            assert_ne!(schedule(round)[0], schedule(round + 1)[0], "round {round}");
        }
    }

    #[test]
    fn every_cold_start_key_is_its_own_pod_service_account_and_role() {
        let keys: BTreeSet<(String, String)> =
            (0..COLD_KEYS).map(|k| (role_arn(k), dev_request(k).to_bytes().escape_ascii().to_string())).collect();
        assert_eq!(keys.len(), COLD_KEYS);
        assert_eq!(
            credentials_path(3),
            "/v1/credentials?role_arn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fbench-3&pod=bench-3"
        );
    }
}
