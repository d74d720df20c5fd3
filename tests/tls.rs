//! TLS to PostgreSQL, for the replication connection and the SQL connection,
//! against clusters of our own (their ssl settings change, so never the shared
//! scratch server): a test CA and a server certificate for `localhost` made
//! here with rcgen, every `sslmode`, the precise errors for an untrusted
//! certificate, a wrong host name and a server without TLS, and SCRAM with
//! channel binding. `hostnossl … reject` lines prove the connections that
//! work really are encrypted; `pg_stat_ssl` says so on the server side.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use walcast::cluster::{Cluster, ClusterConfig};
use walcast::lsn::Lsn;
use walcast::pgconn::{self, PgConfig, TlsError};
use walcast::replication::{
    AckHandle, ReplicationError, ReplicationStream, SlotOptions, StreamConfig, WalConnection, WalEvent,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The password of the SCRAM user (never to appear in an error).
const SCRAM_PASSWORD: &str = "tls-secret-pw";

/// Certificates written for one cluster.
struct Pki {
    /// The CA that signed the server certificate.
    ca: PathBuf,
    /// A CA that signed nothing of ours.
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (params, key)
}

/// A CA, a server certificate for DNS `localhost` only (so `127.0.0.1` is a
/// host name it does not list) and an unrelated CA, in `dir`; the key is
/// `0600` and owned by the server's user, as PostgreSQL insists.
fn write_pki(dir: &Path, owner: (u32, u32)) -> Pki {
    let (ca_params, ca_key) = ca("walcast test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let (other_params, other_key) = ca("walcast unrelated CA");
    let other_cert = other_params.self_signed(&other_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();

    let pki = Pki {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other-ca.pem"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.other_ca, other_cert.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    for file in [&pki.ca, &pki.other_ca, &pki.cert, &pki.key] {
        std::os::unix::fs::chown(file, Some(owner.0), Some(owner.1)).unwrap();
    }
    pki
}

async fn start_cluster() -> Cluster {
    tokio::task::spawn_blocking(|| Cluster::start(ClusterConfig::ephemeral())).await.unwrap().expect("cluster")
}

async fn stop_cluster(cluster: Cluster) {
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

fn config(url: &str) -> PgConfig {
    url.parse().unwrap_or_else(|e| panic!("{e}"))
}

/// An error with its causes, as the operator sees it (`{:#}`).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether the SQL connection of `url` is encrypted, per the server.
async fn sql_ssl(url: &str) -> bool {
    let client = pgconn::connect(&config(url)).await.unwrap_or_else(|e| panic!("sql {url}: {}", chain(&e)));
    client.query_one("select ssl from pg_stat_ssl where pid = pg_backend_pid()", &[]).await.unwrap().get(0)
}

async fn sql_error(url: &str) -> String {
    match pgconn::connect(&config(url)).await {
        Ok(_) => panic!("{url} connected"),
        Err(err) => chain(&err),
    }
}

async fn wal_error(url: &str) -> ReplicationError {
    WalConnection::connect(&config(url), CONNECT_TIMEOUT).await.expect_err(url)
}

/// Turns TLS on (ALTER SYSTEM + reload), rejects every unencrypted TCP
/// connection, and waits until a TLS connection works.
async fn enable_tls(cluster: &mut Cluster, pki: &Pki) {
    let admin = pgconn::connect(&config(&format!("{}?sslmode=disable", cluster.url("postgres")))).await.unwrap();
    for (name, value) in [("ssl_cert_file", &pki.cert), ("ssl_key_file", &pki.key)] {
        admin.batch_execute(&format!("alter system set {name} = '{}'", value.display())).await.unwrap();
    }
    admin.batch_execute("alter system set ssl = on").await.unwrap();
    admin
        .batch_execute(&format!(
            "create role tls_scram login replication password '{SCRAM_PASSWORD}';
             create table public.t (id int primary key, v text);
             create publication tls_pub for table public.t;"
        ))
        .await
        .unwrap();
    drop(admin);
    cluster
        .prepend_hba(&[
            "hostnossl all all 0.0.0.0/0 reject",
            "hostnossl replication all 0.0.0.0/0 reject",
            "hostssl all tls_scram 127.0.0.1/32 scram-sha-256",
            "hostssl replication tls_scram 127.0.0.1/32 scram-sha-256",
        ])
        .unwrap();
    // The reload is asynchronous: wait for the server to offer TLS.
    let url = format!("{}?sslmode=require", cluster.url("postgres"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match pgconn::connect(&config(&url)).await {
            Ok(_) => return,
            Err(err) if tokio::time::Instant::now() > deadline => panic!("TLS never came up: {}", chain(&err)),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn tls_server_every_mode_and_the_errors_that_name_the_fix() {
    let mut cluster = start_cluster().await;
    let owner = std::fs::metadata(cluster.root().join("data")).unwrap();
    let pki = write_pki(cluster.root(), (owner.uid(), owner.gid()));
    enable_tls(&mut cluster, &pki).await;
    let port = cluster.port();
    let ca = pki.ca.display().to_string();
    let other = pki.other_ca.display().to_string();
    let url = |host: &str, params: &str| format!("postgres://postgres@{host}:{port}/postgres?{params}");

    // SQL: every mode that may use TLS does, with the checks it promises.
    for params in [
        "sslmode=prefer".to_owned(),
        "sslmode=require".to_owned(),
        format!("sslmode=require&sslrootcert={ca}"),
        format!("sslmode=verify-ca&sslrootcert={ca}"),
    ] {
        for host in ["localhost", "127.0.0.1"] {
            assert!(sql_ssl(&url(host, &params)).await, "{host} {params}");
        }
    }
    assert!(sql_ssl(&url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).await);
    // A key=value string works the same.
    let conninfo =
        format!("host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{ca}'");
    assert!(sql_ssl(&conninfo).await);
    // The realtime catalog reads the publication over the same settings.
    let catalog = walcast::realtime::catalog::Catalog::load(
        config(&url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))),
        &["tls_pub".to_owned()],
    )
    .await
    .expect("catalog over verify-full");
    assert!(catalog.get("public", "t").is_some());
    // Plain connections are refused by pg_hba.conf: the ones above were TLS.
    let err = sql_error(&url("127.0.0.1", "sslmode=disable")).await;
    assert!(err.contains("no encryption"), "{err}");

    // Replication over verify-full: slot, a committed insert streamed, and
    // the server's view of the walsender.
    let mut wal = WalConnection::connect(
        &config(&url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))),
        CONNECT_TIMEOUT,
    )
    .await
    .expect("replication over verify-full");
    assert!(wal.is_tls());
    let pid = wal.pid();
    let created = wal.create_slot("tls_slot", false).await.unwrap();
    wal.start_replication(&SlotOptions::new("tls_slot", "tls_pub"), Lsn::ZERO).await.unwrap();
    let mut stream = ReplicationStream::new(
        wal,
        AckHandle::new(created.consistent_point),
        StreamConfig { status_interval: Duration::from_millis(100), ..StreamConfig::default() },
        created.consistent_point,
    );
    let sql =
        pgconn::connect(&config(&url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")))).await.unwrap();
    sql.batch_execute("insert into public.t values (1, 'over tls')").await.unwrap();
    let mut tags = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !tags.contains(&b'C') {
            if let WalEvent::XLogData { data, .. } = stream.next().await.expect("stream") {
                tags.push(data[0]);
            }
        }
    })
    .await
    .expect("the insert's commit streams");
    assert!(tags.contains(&b'I'), "{tags:?}");
    let walsender_ssl: bool = sql
        .query_one(
            "select s.ssl from pg_stat_ssl s join pg_stat_replication r on r.pid = s.pid where r.pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(walsender_ssl, "pg_stat_ssl of the walsender");
    drop(stream);

    // The other modes on the replication side.
    for (host, params) in [
        ("127.0.0.1", "sslmode=prefer".to_owned()),
        ("127.0.0.1", "sslmode=require".to_owned()),
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
    ] {
        let mut wal = WalConnection::connect(&config(&url(host, &params)), CONNECT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}"));
        assert!(wal.is_tls(), "{params}");
        wal.identify_system().await.unwrap();
        wal.terminate().await;
    }
    let err = wal_error(&url("127.0.0.1", "sslmode=disable")).await;
    assert!(err.to_string().contains("no encryption"), "{err}");

    // An untrusted chain: the error names the file and the way out.
    let wrong_ca = format!("sslmode=verify-ca&sslrootcert={other}");
    let err = sql_error(&url("localhost", &wrong_ca)).await;
    assert!(err.contains(&format!("server certificate is not signed by the CA in sslrootcert={other}")), "{err}");
    assert!(err.contains("sslmode=require"), "{err}");
    let err = wal_error(&url("localhost", &wrong_ca)).await;
    assert!(matches!(&err, ReplicationError::Tls(TlsError::UnknownIssuer(p)) if p == &pki.other_ca), "{err:?}");
    assert!(!err.is_transient());
    // sslrootcert with require checks the chain too (libpq's rule).
    let err = wal_error(&url("localhost", &format!("sslmode=require&sslrootcert={other}"))).await;
    assert!(matches!(err, ReplicationError::Tls(TlsError::UnknownIssuer(_))), "{err:?}");

    // verify-full with a host the certificate does not list (it has DNS
    // localhost only); verify-ca does not check the name.
    let full_ip = format!("sslmode=verify-full&sslrootcert={ca}");
    let err = sql_error(&url("127.0.0.1", &full_ip)).await;
    assert!(err.contains("server certificate is not valid for host \"127.0.0.1\""), "{err}");
    assert!(err.contains("(it names localhost)"), "names what the certificate lists: {err}");
    let err = wal_error(&url("127.0.0.1", &full_ip)).await;
    assert!(matches!(&err, ReplicationError::Tls(TlsError::WrongHost { host, .. }) if host == "127.0.0.1"), "{err:?}");
    assert!(!err.is_transient());

    // SCRAM over TLS with channel binding required, on both connections; an
    // error for a user with a password never shows it.
    let scram =
        |host: &str, params: &str| format!("postgres://tls_scram:{SCRAM_PASSWORD}@{host}:{port}/postgres?{params}");
    let bound = "sslmode=require&channel_binding=require";
    assert!(sql_ssl(&scram("127.0.0.1", bound)).await);
    let mut wal = WalConnection::connect(&config(&scram("127.0.0.1", bound)), CONNECT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("replication with channel binding: {e}"));
    assert!(wal.is_tls());
    wal.identify_system().await.unwrap();
    wal.terminate().await;
    let err = wal_error(&scram("localhost", &wrong_ca)).await.to_string();
    assert!(!err.contains(SCRAM_PASSWORD), "{err}");
    let err = sql_error(&scram("localhost", &wrong_ca)).await;
    assert!(!err.contains(SCRAM_PASSWORD), "{err}");

    let _ = sql.batch_execute("select pg_drop_replication_slot('tls_slot')").await;
    drop(sql);
    stop_cluster(cluster).await;
}

#[tokio::test]
async fn plain_server_prefer_falls_back_and_require_fails() {
    let cluster = start_cluster().await;
    let port = cluster.port();
    let dir = tempfile::tempdir().unwrap();
    let pki = write_pki(dir.path(), owner_of(dir.path()));
    let url = |params: &str| format!("postgres://postgres@127.0.0.1:{port}/postgres?{params}");

    // prefer: the server answers the SSLRequest with N, both connections go on in plain.
    assert!(!sql_ssl(&url("sslmode=prefer")).await);
    assert!(!sql_ssl(&cluster.url("postgres")).await, "prefer is the default");
    let mut wal = WalConnection::connect(&config(&url("sslmode=prefer")), CONNECT_TIMEOUT).await.unwrap();
    assert!(!wal.is_tls());
    wal.identify_system().await.unwrap();
    wal.terminate().await;

    // require and verify-*: "does not support TLS", definite.
    for params in ["sslmode=require".to_owned(), format!("sslmode=verify-full&sslrootcert={}", pki.ca.display())] {
        let err = sql_error(&url(&params)).await;
        assert!(err.contains("server does not support TLS"), "{params}: {err}");
        let err = wal_error(&url(&params)).await;
        assert!(matches!(err, ReplicationError::Tls(TlsError::NotSupported(_))), "{params}: {err:?}");
        assert!(err.to_string().contains("server does not support TLS"), "{err}");
        assert!(!err.is_transient());
    }

    // channel_binding=require cannot be met without TLS.
    let err = wal_error(&url("sslmode=prefer&channel_binding=require")).await;
    assert!(matches!(err, ReplicationError::Auth(_)), "{err:?}");
    assert!(err.to_string().contains("channel_binding=require"), "{err}");

    // A Unix socket never uses TLS, whatever the mode (libpq's rule).
    let socket = format!("{} sslmode=require", cluster.socket_conninfo("postgres"));
    assert!(!sql_ssl(&socket).await);
    let wal = WalConnection::connect(&config(&socket), CONNECT_TIMEOUT).await.unwrap();
    assert!(!wal.is_tls());
    wal.terminate().await;

    stop_cluster(cluster).await;
}

fn owner_of(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.uid(), meta.gid())
}
