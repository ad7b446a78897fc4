//! The broker scaled out, on Istio's own translation: three broker replicas
//! behind the `outbound|8080||token-broker…` cluster Istio generates (ring
//! hash, from the rendered DestinationRule), twelve enabled pods over eight
//! roles. Each role's fetches reach one replica (the filter's role-derived
//! `:authority` is what Envoy hashes a wasm `httpCall` on), the roles spread
//! over the replicas, STS sees one exchange per (role, namespace, service
//! account), and losing a replica moves only its roles.
//!
//! The replicas share one real API server; each talks to STS through a
//! token-checking front of its own, so the tokens a front accepted say which
//! replica served which service account (one per role here).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use imds_filter::config::ROLE_ANNOTATION;
use integration::istio::{self, AppSidecar, Cluster, SidecarXds};
use integration::kube_cluster::{self, KubeCluster};
use integration::pki::{self, MeshCa, WorkloadFiles};
use integration::sts_oidc::OidcFront;
use integration::{Envoy, Pod, RealBroker, Sts};
use mesh_config::render::BROKER_PORT;

const ROLES: usize = 8;
/// Roles 0..4 have two pods each, the others one: twelve pods.
const TWO_POD_ROLES: usize = 4;
const REPLICAS: usize = 3;

fn role_arn(role: usize) -> String {
    format!("arn:aws:iam::123456789012:role/role-{role}")
}

fn service_account(role: usize) -> String {
    format!("sa-{role}")
}

/// The pods: `(role, pod)`, each pod running as its role's service account.
fn pods() -> Vec<(usize, Pod)> {
    (0..ROLES)
        .flat_map(|role| (0..if role < TWO_POD_ROLES { 2 } else { 1 }).map(move |k| (role, k)))
        .map(|(role, k)| {
            let pod = Pod {
                name: format!("app-{role}-{k}"),
                service_account: service_account(role),
                ..Pod::enabled().annotation(ROLE_ANNOTATION, &role_arn(role))
            };
            (role, pod)
        })
        .collect()
}

/// Pod `i`'s address: a loopback address its sidecar connects from, which
/// the broker checks against the pod's.
fn pod_ip(i: usize) -> String {
    format!("127.244.3.{}", 10 + i)
}

/// Where replica `i`'s sidecar listens: fixed loopback addresses, so the
/// ring Envoy builds over them, and so which role lands where, is the same
/// in every run.
fn replica_address(i: usize) -> SocketAddr {
    let address = SocketAddr::from(([127, 77, 0, 10 + u8::try_from(i).unwrap_or(0)], BROKER_PORT));
    assert!(std::net::TcpListener::bind(address).is_ok(), "{address} is taken: another run of this test?");
    address
}

/// One broker replica: its STS front, the broker, and its sidecar on
/// Istio's output.
struct Replica {
    sts: OidcFront,
    _broker: RealBroker,
    _sidecar: Envoy,
    address: SocketAddr,
}

impl Replica {
    /// The service accounts this replica has exchanged tokens for at STS,
    /// in order.
    fn served(&self) -> Vec<String> {
        let subjects =
            self.sts.seen().accepted.into_iter().filter_map(|claims| claims["sub"].as_str().map(str::to_owned));
        subjects.map(|sub| sub.trim_start_matches("system:serviceaccount:default:").to_owned()).collect()
    }
}

/// The default rendering with the pods and the broker replicas at
/// `broker_ips`.
fn cluster(broker_ips: &[String]) -> Cluster {
    let options = istio::translated_options();
    pods()
        .iter()
        .enumerate()
        .fold(Cluster::rendered(&options).object(kube_cluster::namespace("default")), |c, (i, (_, pod))| {
            c.app_pod(pod, &pod_ip(i))
        })
        .broker_pods(&broker_ips.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Starts a sidecar per pod on `xds`, asks each for its credentials, and
/// returns how many pods got them.
async fn fetch_everywhere(
    xds: &mut BTreeMap<String, SidecarXds>,
    certificates: &BTreeMap<String, WorkloadFiles>,
    brokers: &[(String, SocketAddr)],
) -> usize {
    let mut served = 0;
    for (role, pod) in pods() {
        let generated = xds.remove(&istio::proxy_of(&pod)).unwrap_or_else(|| panic!("no config for {}", pod.name));
        let sidecar = AppSidecar::start(&generated, &certificates[&service_account(role)], brokers, 1).await;
        sidecar.wait_for_credentials(&format!("role-{role}")).await;
        served += 1;
    }
    served
}

#[tokio::test]
async fn each_role_lives_on_one_replica_and_a_lost_replica_moves_only_its_roles() {
    let sts = Sts::start().await;
    let ca = MeshCa::new("mesh");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let broker_files = ca.workload(&[&pki::broker_id()]).write(dir.path(), "broker");
    let certificates: BTreeMap<String, WorkloadFiles> = (0..ROLES)
        .map(|role| {
            let sa = service_account(role);
            let files = ca.workload(&[&pki::spiffe_id("default", &sa)]).write(dir.path(), &sa);
            (sa, files)
        })
        .collect();

    let broker_ips: Vec<String> = (0..REPLICAS).map(istio::broker_ip).collect();
    let options = istio::translated_options();
    let all_pods: Vec<String> = pods().iter().map(|(_, pod)| istio::proxy_of(pod)).collect();
    let broker_ids: Vec<String> = (0..REPLICAS).map(|i| istio::broker_proxy(&options, i)).collect();
    let wanted: Vec<&str> = all_pods.iter().chain(&broker_ids).map(String::as_str).collect();
    let mut xds = cluster(&broker_ips).generate(&wanted);

    let kube = KubeCluster::start().await;
    for (i, (_, pod)) in pods().iter().enumerate() {
        kube.create_pod(istio::kube_pod(pod), &pod_ip(i)).await;
    }
    let mut replicas = Vec::new();
    for (i, id) in broker_ids.iter().enumerate() {
        let front = OidcFront::start(kube.admin(), sts.addr()).await;
        let broker = RealBroker::on(&kube, format!("http://{}", front.addr())).await.xfcc().start().await;
        let address = replica_address(i);
        let generated = xds.remove(id).unwrap_or_else(|| panic!("no config for {id}"));
        let sidecar = istio::start_broker_sidecar(&generated, address, broker.addr, &broker_files).await;
        replicas.push(Replica { sts: front, _broker: broker, _sidecar: sidecar, address });
    }
    let endpoints: Vec<(String, SocketAddr)> =
        replicas.iter().enumerate().map(|(i, r)| (format!("{}:{BROKER_PORT}", broker_ips[i]), r.address)).collect();

    // Twelve pods, eight roles, three replicas.
    assert_eq!(fetch_everywhere(&mut xds, &certificates, &endpoints).await, 12);
    let served: Vec<Vec<String>> = replicas.iter().map(Replica::served).collect();
    for (i, accounts) in served.iter().enumerate() {
        println!("replica {i}: {} STS exchanges, for {accounts:?}", accounts.len());
    }
    // One exchange per (role, namespace, service account), on one replica.
    let all: Vec<&String> = served.iter().flatten().collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!((all.len(), distinct.len()), (ROLES, ROLES), "exchanges per replica: {served:?}");
    // The roles spread over the replicas.
    let busy = served.iter().filter(|accounts| !accounts.is_empty()).count();
    assert!(busy >= 2, "every role landed on one replica: {served:?}");

    // Replica `lost` goes away; Kubernetes drops its endpoint, istiod
    // pushes the two that remain, and every pod's sidecar starts afresh.
    let lost = (0..REPLICAS).max_by_key(|&i| served[i].len()).unwrap_or(0);
    let moved: BTreeSet<String> = served[lost].iter().cloned().collect();
    let alive: Vec<usize> = (0..REPLICAS).filter(|&i| i != lost).collect();
    let before: Vec<usize> = replicas.iter().map(|r| r.served().len()).collect();
    drop(replicas.remove(lost));
    let remaining_ips: Vec<String> = alive.iter().map(|&i| broker_ips[i].clone()).collect();
    let mut xds = cluster(&remaining_ips).generate(&all_pods.iter().map(String::as_str).collect::<Vec<_>>());
    let alive_endpoints: Vec<(String, SocketAddr)> = alive
        .iter()
        .zip(&replicas)
        .map(|(&i, replica)| (format!("{}:{BROKER_PORT}", broker_ips[i]), replica.address))
        .collect();
    assert_eq!(fetch_everywhere(&mut xds, &certificates, &alive_endpoints).await, 12);

    // Only the lost replica's roles were exchanged again, once each, on a
    // surviving replica; every other role was served from the cache of the
    // replica it was on.
    let after: Vec<Vec<String>> =
        alive.iter().zip(&replicas).map(|(&i, replica)| replica.served().split_off(before[i])).collect();
    for (i, accounts) in alive.iter().zip(&after) {
        println!(
            "after losing replica {lost}: replica {i} made {} new STS exchanges, for {accounts:?}",
            accounts.len()
        );
    }
    let again: Vec<&String> = after.iter().flatten().collect();
    assert_eq!(again.iter().map(|a| (*a).clone()).collect::<BTreeSet<_>>(), moved, "moved: {after:?}");
    assert_eq!(again.len(), moved.len(), "a moved role was exchanged twice: {after:?}");
}
