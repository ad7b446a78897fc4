//! `bench-broker`: what the token broker's cache buys, measured against the
//! real service (`token_broker::server::run`) in this process, over loopback,
//! with a real Kubernetes API server (the broker as its own service account,
//! with the rendered RBAC) and a scripted STS.
//!
//! Four parts. The first two on one broker:
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
//! Then prefetch, on two brokers of their own (prefetch on, then off):
//! [`NEW_PODS`] pods created one by one, each sending its first request
//! [`APP_START`] after its creation; the latency of those first requests,
//! and how many the cache answered (all, with prefetch on).
//!
//! Then memory, on a broker of its own: [`SCALE_PODS`] opted-in pods shaped
//! like Istio-injected workload pods are created in the API server, a
//! broker started in a child process (this binary in its child mode:
//! `token_broker::app::App` and `server::run`, as the `token-broker` binary
//! serves them) watches them, and one credential request per pod fills its
//! cache with as many keys (each pod has a role of its own; a scripted STS
//! without delay). The child's RSS (`/proc/<pid>/status`) is read once its
//! watch has synced and again with every key cached; a second child that
//! keeps whole `Pod` objects in a kube reflector, as the broker did before,
//! shows what the reduced store saves. A child process, so the figure is
//! the broker's alone: in this process it would include the harness (the
//! client that created the pods, the STS, the first broker), and a
//! before/after difference would be blurred by memory the allocator keeps
//! after the harness frees it. Not the `token-broker` binary itself: its
//! fixed fetch rate (20 a second) would take over eight minutes to fill
//! 10,000 keys; the child raises it, and serves otherwise the same. The
//! whole-`Pod` child needs about 1.5 GB.
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
//! [--duration SECS] [--connections N]`. (`--memory-child MODE STS_URL` is
//! the child mode, with `KUBECONFIG` set; not for use by hand.)

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use imds_filter::config::{ENABLE_LABEL, ENABLED_VALUE, ROLE_ANNOTATION};
use integration::bench::{self, Options, Sample, WARM_UP_SECS, WRK_THREADS, Wrk, load_average, nproc, verdict};
use integration::broker::Scripted;
use integration::kube_cluster::{self, BROKER_USER, KubeCluster};
use integration::{RealBroker, Req, ScriptedSts};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use token_broker::identity::{DEV_NAMESPACE_HEADER, DEV_SERVICE_ACCOUNT_HEADER};

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, mode, sts_endpoint] = &args[..]
        && flag == MEMORY_CHILD_FLAG
    {
        return memory_child(mode, sts_endpoint);
    }
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
    println!();

    bench.first_requests().await?;
    memory(&bench.kube).await
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
        // Prefetch off: its pods exist before it starts (so it would not
        // prefetch them anyway), and the memory part's 10,000 new pods must
        // not become 10,000 fetches of this broker.
        let broker = RealBroker::on(&kube, sts.endpoint()).await.tune(|config| config.prefetch = false).start().await;

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

// ---------------------------------------------------------------------------
// Prefetch: a new pod's first request, with and without.

/// New pods per mode, each with a key of its own (service account and role).
const NEW_PODS: usize = 10;
/// Keys of the new pods start here, clear of the cold-start keys.
const NEW_POD_KEYS: usize = 100;
/// How long after its pod is created the pod's first request comes: a
/// stand-in for the time its containers take to start, which in a cluster
/// is seconds (image pull, the sidecar first).
const APP_START: Duration = Duration::from_secs(1);

impl Bench {
    /// For each mode, a broker of its own on the same API server and STS;
    /// [`NEW_PODS`] pods are created one by one, and each sends its first
    /// request [`APP_START`] after it was created. Prints the latency of
    /// those first requests and how the broker's cache answered them.
    async fn first_requests(&self) -> Result<(), String> {
        println!(
            "new pods     {NEW_PODS} per mode, each its own key; first request {} ms after the pod is created; \
                  STS answers after {} ms",
            APP_START.as_millis(),
            STS_DELAY.as_millis()
        );
        for (mode, prefetch) in [("prefetch on", true), ("prefetch off", false)] {
            let broker = RealBroker::on(&self.kube, self.sts.endpoint())
                .await
                .tune(|config| config.prefetch = prefetch)
                .start()
                .await;
            let first = NEW_POD_KEYS + if prefetch { 0 } else { NEW_PODS };
            let mut latencies = Vec::with_capacity(NEW_PODS);
            for key in first..first + NEW_PODS {
                self.kube.add_pod(pod(key)).await;
                tokio::time::sleep(APP_START).await;
                let started = Instant::now();
                let reply = dev_request(key).send(broker.addr).await;
                latencies.push(started.elapsed());
                if reply.status != 200 {
                    return Err(format!("{mode}: new pod {key} answered {}: {}", reply.status, reply.body_text()));
                }
            }
            latencies.sort();
            let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
            let metrics = Req::get("/metrics").host("token-broker").send(broker.admin_addr).await.body_text();
            let hits = metrics.lines().find_map(|l| l.strip_prefix("token_broker_cache_hits_total ")).unwrap_or("?");
            println!(
                "             {mode:<12}  first request p50 {} ms, max {} ms; cache hits {hits} of {NEW_PODS}",
                ms(latencies[NEW_PODS / 2]),
                ms(latencies[NEW_PODS - 1]),
            );
        }
        println!();
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Memory: the broker with SCALE_PODS pods watched and as many keys cached.

/// Pods watched, and keys cached, in the memory part.
const SCALE_PODS: usize = 10_000;
/// Their namespace and service account.
const SCALE_NAMESPACE: &str = "bench-scale";
/// API calls (pod creates, status patches) and credential requests in
/// flight at once while filling: enough to keep the API server busy on two
/// cores, few enough not to queue for long.
const SCALE_CONCURRENCY: usize = 32;
/// The target for the broker's RSS with everything watched and cached.
const RSS_TARGET_MB: f64 = 64.0;
/// The first argument of the child mode.
const MEMORY_CHILD_FLAG: &str = "--memory-child";

async fn memory(kube: &KubeCluster) -> Result<(), String> {
    println!(
        "memory       {SCALE_PODS} opted-in pods (Istio-injected shape) watched and {SCALE_PODS} keys cached, \
         by a broker in a child process; RSS from /proc/<pid>/status"
    );
    let started = Instant::now();
    let tokens_before = kube.token_requests(BROKER_USER).len();
    kube.service_account(SCALE_NAMESPACE, SCALE_NAMESPACE).await;
    let pods = Api::<Pod>::namespaced(kube.admin(), SCALE_NAMESPACE);
    let created = futures_util::stream::iter(0..SCALE_PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod = scale_pod(i);
                pods.create(&PostParams::default(), &pod).await.map_err(|e| format!("create pod {i}: {e}"))?;
                let status = scale_pod_status(i);
                pods.patch_status(&scale_name(i), &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .map_err(|e| format!("patch pod {i}: {e}"))
            }
        })
        .buffer_unordered(SCALE_CONCURRENCY)
        .try_collect::<Vec<Pod>>()
        .await?;
    let stored = created.last().map(|pod| serde_json::to_vec(pod).map(|json| json.len()).unwrap_or_default());
    println!(
        "  pods       {} created in {:.0} s; one is {:.1} KB of JSON as the API server stores it \
         (managed fields included)",
        created.len(),
        started.elapsed().as_secs_f64(),
        stored.unwrap_or_default() as f64 / 1024.0
    );
    drop(created);

    let sts = ScriptedSts::start(|call| sts_success(call, Duration::ZERO)).await;
    let kubeconfig = kube.dir().join("bench-broker.kubeconfig");
    kube.broker_config(&mesh_config::render::Options::default()).await;
    let token = kube.token(&mesh_config::render::Options::default().namespace, mesh_config::render::BROKER).await;
    std::fs::write(&kubeconfig, kube.kubeconfig(&token)).map_err(|e| format!("{}: {e}", kubeconfig.display()))?;

    // The broker as it keeps pods now.
    let (mut child, ready) = spawn_memory_child("broker", &sts.endpoint(), &kubeconfig).await?;
    let synced = memory_of(&child)?;
    let addr: std::net::SocketAddr = ready.parse().map_err(|e| format!("child said {ready:?}: {e}"))?;
    let started = Instant::now();
    let requests = futures_util::stream::iter(0..SCALE_PODS)
        .map(|i| async move { scale_request(i).send(addr).await.status })
        .buffer_unordered(SCALE_CONCURRENCY)
        .collect::<Vec<u16>>()
        .await;
    let ok = requests.iter().filter(|status| **status == 200).count();
    let filled = started.elapsed();
    let metrics = Req::get("/metrics").host("token-broker").send(addr).await.body_text();
    let keys = metrics.lines().find_map(|line| line.strip_prefix("token_broker_cache_keys ")).unwrap_or("?").to_owned();
    let cached = memory_of(&child)?;
    let _ = child.kill().await;

    // The same watch keeping whole pods, as the broker did before.
    let (mut whole, listed) = spawn_memory_child("whole-pods", &sts.endpoint(), &kubeconfig).await?;
    let whole_rss = memory_of(&whole)?;
    let _ = whole.kill().await;

    println!(
        "  keys       {ok} of {SCALE_PODS} requests answered 200 in {:.0} s; cache_keys {keys}; \
         TokenRequests {}, STS calls {}",
        filled.as_secs_f64(),
        kube.token_requests(BROKER_USER).len().saturating_sub(tokens_before),
        sts.request_count()
    );
    println!("{:<42} {:>9} {:>10}", "broker RSS (child process)", "measured", "goal");
    println!("{:<42} {:>9}", format!("{SCALE_PODS} pods watched, nothing cached"), bench::mb(synced.rss_kb));
    println!(
        "{:<42} {:>9} {:>10} {}",
        format!("{SCALE_PODS} pods watched, {keys} keys cached"),
        bench::mb(cached.rss_kb),
        format!("<= {RSS_TARGET_MB:.0} MB"),
        verdict((cached.rss_kb as f64 / 1024.0) <= RSS_TARGET_MB)
    );
    println!("{:<42} {:>9}", "peak (VmHWM) since the child started", bench::mb(cached.peak_kb));
    println!("{:<42} {:>9}", format!("whole Pods in a reflector ({listed} listed)"), bench::mb(whole_rss.rss_kb));
    println!();
    Ok(())
}

/// Starts this binary in its child `mode` (`broker` or `whole-pods`) and
/// waits for the line saying it has synced; returns the child and the rest
/// of that line.
async fn spawn_memory_child(
    mode: &str,
    sts_endpoint: &str,
    kubeconfig: &std::path::Path,
) -> Result<(tokio::process::Child, String), String> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().map_err(|e| format!("this binary: {e}"))?;
    let mut child = tokio::process::Command::new(exe)
        .args([MEMORY_CHILD_FLAG, mode, sts_endpoint])
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("memory child: {e}"))?;
    let stdout = child.stdout.take().ok_or("memory child: no stdout")?;
    let line = tokio::time::timeout(Duration::from_secs(300), tokio::io::BufReader::new(stdout).lines().next_line())
        .await
        .map_err(|_| format!("memory child {mode}: not synced after 300 s"))?
        .map_err(|e| format!("memory child {mode}: {e}"))?
        .ok_or_else(|| format!("memory child {mode} exited"))?;
    let ready = line.strip_prefix("synced ").ok_or_else(|| format!("memory child {mode} said {line:?}"))?;
    Ok((child, ready.to_owned()))
}

/// The memory of a child process now.
fn memory_of(child: &tokio::process::Child) -> Result<bench::Memory, String> {
    bench::Memory::of(child.id().ok_or("the memory child has exited")?)
}

/// The child mode: `broker` serves `token_broker::server::run` on loopback
/// (`insecure-dev`, the cache's fetch rate raised so the parent can fill
/// it) and prints `synced <address>` once its watch has synced; `whole-pods`
/// keeps the opted-in pods whole in a kube reflector and prints `synced
/// <count>`. Either then runs until killed.
fn memory_child(mode: &str, sts_endpoint: &str) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("memory child: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_memory_child(mode, sts_endpoint)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(problem) => {
            eprintln!("memory child: {problem}");
            ExitCode::FAILURE
        }
    }
}

async fn run_memory_child(mode: &str, sts_endpoint: &str) -> Result<(), String> {
    use token_broker::app::{App, AppConfig};
    use token_broker::identity::IdentityMode;
    use token_broker::server;
    use token_broker::shutdown::Shutdown;
    use token_broker::sts::{StsClient, StsConfig};
    let config = kube::Config::infer().await.map_err(|e| format!("KUBECONFIG: {e}"))?;
    let client = token_broker::kube::client(config).map_err(|e| e.to_string())?;
    match mode {
        "broker" => {
            let mut config = AppConfig::new(IdentityMode::InsecureDev { trust_domain: "cluster.local".into() });
            config.cache.fetches_per_second = 2000;
            config.cache.fetch_burst = 2000;
            config.cache.max_concurrent_fetches = SCALE_CONCURRENCY;
            let sts = StsClient::new(StsConfig {
                endpoint_url: Some(sts_endpoint.to_owned()),
                ..StsConfig::new("us-east-1")
            })
            .map_err(|e| e.to_string())?;
            let app = std::sync::Arc::new(App::new(config, client, sts, "bench-memory"));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let shutdown = Shutdown::default();
            tokio::spawn(server::run(listener, std::sync::Arc::clone(&app), shutdown.signal()));
            while !app.is_synced() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("synced {addr}");
            std::future::pending::<()>().await;
        }
        "whole-pods" => {
            use kube::runtime::{WatchStreamExt, reflector, watcher};
            let (store, writer) = reflector::store::<Pod>();
            let selector = format!("{ENABLE_LABEL}={ENABLED_VALUE}");
            let events = watcher(Api::<Pod>::all(client), watcher::Config::default().labels(&selector))
                .default_backoff()
                .reflect(writer);
            tokio::spawn(events.for_each(|_| std::future::ready(())));
            store.wait_until_ready().await.map_err(|e| e.to_string())?;
            println!("synced {}", store.state().len());
            std::future::pending::<()>().await;
        }
        other => return Err(format!("unknown mode {other:?}")),
    }
    Ok(())
}

fn scale_name(i: usize) -> String {
    format!("scale-{i}")
}

fn scale_role(i: usize) -> String {
    format!("arn:aws:iam::123456789012:role/scale-{i}")
}

/// Pod `i`'s own credential request, as the `insecure-dev` caller its
/// service account is.
fn scale_request(i: usize) -> Req {
    integration::real_broker::dev_credentials_request(SCALE_NAMESPACE, SCALE_NAMESPACE, &scale_role(i), &scale_name(i))
}

/// Pod `i` as a Deployment's pod looks once Istio's injector has added its
/// sidecar (native sidecar, `istio-init`) and the API server its token
/// volume: the labels, annotations, containers, probes, environment and
/// volumes a real workload pod carries, opted in with a role of its own.
fn scale_pod(i: usize) -> Pod {
    let env = |pairs: &[(&str, &str)]| -> Vec<serde_json::Value> {
        pairs.iter().map(|(name, value)| serde_json::json!({ "name": name, "value": value })).collect()
    };
    let field = |name: &str, path: &str| serde_json::json!({ "name": name, "valueFrom": { "fieldRef": { "apiVersion": "v1", "fieldPath": path } } });
    let mut proxy_env = env(&[
        ("PILOT_CERT_PROVIDER", "istiod"),
        ("CA_ADDR", "istiod.istio-system.svc:15012"),
        ("ISTIO_CPU_LIMIT", "2"),
        ("PROXY_CONFIG", "{}\n"),
        ("ISTIO_META_POD_PORTS", "[{\"name\":\"http\",\"containerPort\":8080,\"protocol\":\"TCP\"}]"),
        ("ISTIO_META_APP_CONTAINERS", "app"),
        ("GOMEMLIMIT", "1073741824"),
        ("GOMAXPROCS", "2"),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("ISTIO_META_NODE_NAME", "node-1"),
        ("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"),
        ("ISTIO_META_WORKLOAD_NAME", "scale"),
        ("ISTIO_META_OWNER", "kubernetes://apis/apps/v1/namespaces/bench-scale/deployments/scale"),
        ("ISTIO_META_MESH_ID", "cluster.local"),
        ("TRUST_DOMAIN", "cluster.local"),
    ]);
    proxy_env.extend([
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("INSTANCE_IP", "status.podIP"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("HOST_IP", "status.hostIP"),
        field("ISTIO_CPU_LIMIT", "metadata.name"),
    ]);
    let mounts = |names: &[(&str, &str)]| -> Vec<serde_json::Value> {
        names.iter().map(|(name, path)| serde_json::json!({ "name": name, "mountPath": path })).collect()
    };
    let resources = serde_json::json!({
        "limits": { "cpu": "2", "memory": "1Gi" },
        "requests": { "cpu": "100m", "memory": "128Mi" },
    });
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": scale_name(i),
            "namespace": SCALE_NAMESPACE,
            "generateName": "scale-7d9f8b6c5-",
            "labels": {
                "app": "scale",
                "pod-template-hash": "7d9f8b6c5",
                "security.istio.io/tlsMode": "istio",
                "service.istio.io/canonical-name": "scale",
                "service.istio.io/canonical-revision": "latest",
                ENABLE_LABEL: ENABLED_VALUE,
            },
            "annotations": {
                ROLE_ANNOTATION: scale_role(i),
                "istio.io/rev": "default",
                "kubectl.kubernetes.io/default-container": "app",
                "kubectl.kubernetes.io/default-logs-container": "app",
                "prometheus.io/path": "/stats/prometheus",
                "prometheus.io/port": "15020",
                "prometheus.io/scrape": "true",
                "sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\",\"istio-proxy\"],\"containers\":null,\
                    \"volumes\":[\"workload-socket\",\"credential-socket\",\"workload-certs\",\"istio-envoy\",\
                    \"istio-data\",\"istio-podinfo\",\"istio-token\",\"istiod-ca-cert\"],\"imagePullSecrets\":null,\
                    \"revision\":\"default\"}",
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "scale-7d9f8b6c5",
                "uid": "5b1e3c1a-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "serviceAccountName": SCALE_NAMESPACE,
            "nodeName": "node-1",
            "initContainers": [
                {
                    "name": "istio-init",
                    "image": "docker.io/istio/proxyv2:1.28.0",
                    "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                             "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"],
                    "resources": resources,
                    "securityContext": { "allowPrivilegeEscalation": false, "privileged": false,
                        "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
                        "readOnlyRootFilesystem": false, "runAsGroup": 0, "runAsNonRoot": false, "runAsUser": 0 },
                },
                {
                    "name": "istio-proxy",
                    "image": "docker.io/istio/proxyv2:1.28.0",
                    "restartPolicy": "Always",
                    "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local",
                             "--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info"],
                    "env": proxy_env,
                    "ports": [{ "containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP" }],
                    "readinessProbe": { "httpGet": { "path": "/healthz/ready", "port": 15021 },
                        "periodSeconds": 15, "timeoutSeconds": 3, "failureThreshold": 4 },
                    "startupProbe": { "httpGet": { "path": "/healthz/ready", "port": 15021 },
                        "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 600 },
                    "resources": resources,
                    "securityContext": { "allowPrivilegeEscalation": false, "privileged": false,
                        "capabilities": { "drop": ["ALL"] }, "readOnlyRootFilesystem": true,
                        "runAsGroup": 1337, "runAsNonRoot": true, "runAsUser": 1337 },
                    "volumeMounts": mounts(&[
                        ("workload-socket", "/var/run/secrets/workload-spiffe-uds"),
                        ("credential-socket", "/var/run/secrets/credential-uds"),
                        ("workload-certs", "/var/run/secrets/workload-spiffe-credentials"),
                        ("istiod-ca-cert", "/var/run/secrets/istio"),
                        ("istio-data", "/var/lib/istio/data"),
                        ("istio-envoy", "/etc/istio/proxy"),
                        ("istio-token", "/var/run/secrets/tokens"),
                        ("istio-podinfo", "/etc/istio/pod"),
                    ]),
                },
            ],
            "containers": [{
                "name": "app",
                "image": "registry.example/team/app:1.4.2",
                "env": env(&[("AWS_REGION", "eu-west-1"), ("LOG_LEVEL", "info"), ("PORT", "8080")]),
                "ports": [{ "containerPort": 8080, "name": "http", "protocol": "TCP" }],
                "readinessProbe": { "httpGet": { "path": "/app-health/app/readyz", "port": 15020 }, "periodSeconds": 10 },
                "resources": { "limits": { "memory": "256Mi" }, "requests": { "cpu": "50m", "memory": "64Mi" } },
            }],
            "volumes": [
                { "name": "workload-socket", "emptyDir": {} },
                { "name": "credential-socket", "emptyDir": {} },
                { "name": "workload-certs", "emptyDir": {} },
                { "name": "istio-envoy", "emptyDir": { "medium": "Memory" } },
                { "name": "istio-data", "emptyDir": {} },
                { "name": "istio-podinfo", "downwardAPI": { "items": [
                    { "path": "labels", "fieldRef": { "fieldPath": "metadata.labels" } },
                    { "path": "annotations", "fieldRef": { "fieldPath": "metadata.annotations" } },
                ] } },
                { "name": "istio-token", "projected": { "sources": [{ "serviceAccountToken": {
                    "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token" } }] } },
                { "name": "istiod-ca-cert", "configMap": { "name": "istio-ca-root-cert" } },
            ],
        },
    }))
    .unwrap_or_else(|e| panic!("scale pod: {e}"))
}

/// What a kubelet reports for pod `i`: running at its own IP, ready, its
/// containers started.
fn scale_pod_status(i: usize) -> serde_json::Value {
    let ip = format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
    let started = serde_json::json!({ "running": { "startedAt": "2026-11-30T08:00:00Z" } });
    let container = |name: &str, image: &str| {
        serde_json::json!({
            "name": name, "image": image, "imageID": format!("{image}@sha256:{}", "0".repeat(64)),
            "containerID": format!("containerd://{}", "1".repeat(64)), "ready": true, "restartCount": 0,
            "started": true, "state": started,
        })
    };
    let conditions = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"].map(
        |kind| serde_json::json!({ "type": kind, "status": "True", "lastTransitionTime": "2026-11-30T08:00:00Z" }),
    );
    serde_json::json!({ "status": {
        "phase": "Running",
        "hostIP": "192.168.0.10",
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "qosClass": "Burstable",
        "startTime": "2026-11-30T08:00:00Z",
        "conditions": conditions,
        "initContainerStatuses": [container("istio-init", "docker.io/istio/proxyv2:1.28.0"),
                                  container("istio-proxy", "docker.io/istio/proxyv2:1.28.0")],
        "containerStatuses": [container("app", "registry.example/team/app:1.4.2")],
    }})
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
