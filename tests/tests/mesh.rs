//! The QUIC mesh between real `hamd` processes on 127.0.0.x, with real certificates:
//! membership, `ham --node`, cross-node events, node failure and failover, and peers
//! that must be refused.

use ham_tests::{TestNode, Value, wait_until};
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

static PORT: AtomicU16 = AtomicU16::new(0);

/// A mesh port of its own for each test (several tests run at once).
fn port() -> u16 {
    let base = 20_000 + (std::process::id() % 400) as u16 * 100;
    base + PORT.fetch_add(1, Ordering::SeqCst)
}

/// A cluster CA and certificates for `names`, made with the real `ham cert`.
fn certs(dir: &Path, names: &[&str]) {
    let ham = ham_tests::bin("ham");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&ham)
            .args(args)
            .output()
            .expect("ham runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let d = dir.to_str().expect("utf-8 path");
    run(&["cert", "init-ca", "--dir", d]);
    for n in names {
        run(&["cert", "issue", n, "--dir", d]);
    }
}

/// Starts node `name` on 127.0.0.`host`:`port`, joining through `seed`.
fn node(
    dir: &Path,
    name: &str,
    host: u8,
    port: u16,
    seed: Option<(u8, u16)>,
    config: Option<&str>,
) -> TestNode {
    let p = |f: &str| dir.join(f).display().to_string();
    let mut args = vec![
        "--mesh-listen".to_string(),
        format!("127.0.0.{host}:{port}"),
        "--mesh-cert".into(),
        p(&format!("{name}.crt")),
        "--mesh-key".into(),
        p(&format!("{name}.key")),
        "--mesh-ca".into(),
        p("ca.crt"),
    ];
    if let Some((h, pt)) = seed {
        args.push("--mesh-seed".into());
        args.push(format!("127.0.0.{h}:{pt}"));
    }
    TestNode::start_custom("mesh", name.to_string(), config, args)
}

fn states(n: &TestNode) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(&n.ham(&["nodes", "--json"])).expect("json");
    let mut out: Vec<(String, String)> = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_string(),
                m["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn all_up(n: &TestNode, names: &[&str]) -> bool {
    let s = states(n);
    names
        .iter()
        .all(|x| s.iter().any(|(name, st)| name == x && st == "up"))
}

/// Unique node names per test run (state files live in /dev/shm).
fn names(tag: &str) -> [String; 3] {
    let id = std::process::id();
    [
        format!("{tag}a{id}"),
        format!("{tag}b{id}"),
        format!("{tag}c{id}"),
    ]
}

#[test]
fn three_nodes_join_and_answer_for_each_other() {
    let certs_dir = ham_tests::Scratch::new("certs");
    let [a, b, c] = names("j");
    certs(&certs_dir.path, &[&a, &b, &c]);
    let port = port();
    let na = node(&certs_dir.path, &a, 2, port, None, None);
    let mut nb = node(&certs_dir.path, &b, 3, port, Some((2, port)), None);
    let nc = node(&certs_dir.path, &c, 4, port, Some((2, port)), None);
    let all = [a.as_str(), b.as_str(), c.as_str()];
    for n in [&na, &nb, &nc] {
        wait_until("every node sees every other up", 10, || all_up(n, &all));
    }

    // `ham --node b …` does on b what `ham …` does there.
    nb.ham(&["entity", "add", "web", "--restart", "--", "sleep", "300"]);
    // Uptimes move on between the two calls; everything else must be equal.
    let table = |out: String| {
        let mut v: Value = serde_json::from_str(&out).expect("json");
        for e in v["entities"].as_array_mut().into_iter().flatten() {
            e["uptime_ms"] = Value::Null;
        }
        v
    };
    let local = table(nb.ham(&["status", "--json"]));
    let remote = table(na.ham(&["--node", &b, "status", "--json"]));
    assert_eq!(remote["node"], b.as_str());
    assert_eq!(remote["entities"], local["entities"]);

    // A restart on b, asked on a.
    let before = nb.entity("web")["pid"].as_i64().expect("pid");
    na.ham(&["--node", &b, "restart", "web"]);
    let after = nb.wait_entity("web", "restarted", |e| {
        e["pid"].as_i64().is_some_and(|p| p > 0 && p != before)
    });
    assert_eq!(after["state"], "running");

    // A stream of raises, forwarded: b handles every line, in order.
    nb.ham(&["entity", "global", "sensor"]);
    let lines: String = (1..=500).map(|i| format!("reading {i}\n")).collect();
    let out = na.try_ham_with_input(
        &["--node", &b, "raise", "sensor", "--stdin"],
        lines.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raised: Vec<String> = nb
        .events()
        .iter()
        .filter(|e| e["entity"] == "sensor" && e["kind"] == "raise")
        .map(|e| e["detail"].as_str().unwrap_or("").to_string())
        .collect();
    let expected: Vec<String> = (1..=500)
        .map(|i| format!("severity 0: reading {i}"))
        .collect();
    assert_eq!(raised, expected);

    // Status codes travel end to end; an unknown node is a clean error.
    let err = na.ham_fails(&["--node", &b, "restart", "nope"]);
    assert!(err.contains("not found"), "{err}");
    let err = na.ham_fails(&["--node", "nosuchnode", "status"]);
    assert!(err.contains("not reachable"), "{err}");

    // b's events asked on a (an event feed over the mesh) are b's events as b tells
    // them; a node that is not there is a clean error here too.
    let events_of = |out: String| -> Vec<Value> {
        out.lines()
            .map(|l| serde_json::from_str(l).expect("event"))
            .collect()
    };
    let local = events_of(nb.ham(&["events", "--json", "--entity", "web"]));
    let remote = events_of(na.ham(&["--node", &b, "events", "--json", "--entity", "web"]));
    assert!(local.len() >= 3, "{local:?}");
    assert_eq!(remote, local, "b's events, seen from a");
    let err = na.ham_fails(&["--node", "nosuchnode", "events"]);
    assert!(err.contains("not reachable"), "{err}");

    // Events from every node, each node's in order.
    let out = na.ham(&["--node", "all", "events", "--json"]);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("event"))
        .collect();
    let from_b: Vec<&Value> = events.iter().filter(|e| e["node"] == b.as_str()).collect();
    let kinds: Vec<&str> = from_b
        .iter()
        .filter(|e| e["entity"] == "web")
        .map(|e| e["kind"].as_str().unwrap_or(""))
        .collect();
    assert!(kinds.starts_with(&["entity-added", "started"]), "{kinds:?}");
    assert!(kinds.contains(&"restart"), "{kinds:?}");
    let seqs: Vec<u64> = from_b
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "b's events in order: {seqs:?}"
    );
    assert!(
        events.iter().any(|e| e["node"] == c.as_str()),
        "c's events too"
    );
}

#[test]
fn a_dead_node_is_detected_and_its_singleton_fails_over_exactly_once() {
    let certs_dir = ham_tests::Scratch::new("certs");
    let [a, b, c] = names("f");
    certs(&certs_dir.path, &[&a, &b, &c]);
    // `db` runs on c; a and b hold it stopped, and watch c.
    let standby = format!(
        r#"
[[entity]]
name = "db"
command = ["sleep", "300"]
autostart = false

[[entity]]
name = "watch"
global = true
[[entity.condition]]
on = "node-down"
node = "{c}"
action = [{{ do = "failover", entity = "db", candidates = ["{a}", "{b}"] }}]
"#
    );
    let primary = "[[entity]]\nname = \"db\"\ncommand = [\"sleep\", \"300\"]\n";
    let port = port();
    let mut na = node(&certs_dir.path, &a, 2, port, None, Some(&standby));
    let mut nb = node(
        &certs_dir.path,
        &b,
        3,
        port,
        Some((2, port)),
        Some(&standby),
    );
    let mut nc = node(&certs_dir.path, &c, 4, port, Some((2, port)), Some(primary));
    let all = [a.as_str(), b.as_str(), c.as_str()];
    for n in [&na, &nb, &nc] {
        wait_until("every node sees every other up", 10, || all_up(n, &all));
    }
    assert_eq!(na.entity("db")["state"], "stopped");
    assert_eq!(nb.entity("db")["state"], "stopped");
    let db_on_c = nc.entity("db")["pid"].as_i64().expect("pid") as i32;
    nc.track(db_on_c);

    let killed = Instant::now();
    nc.kill_node();
    wait_until("a and b see c down", 10, || {
        states(&na).contains(&(c.clone(), "down".into()))
            && states(&nb).contains(&(c.clone(), "down".into()))
    });
    let detected = killed.elapsed();
    assert!(
        detected < Duration::from_secs(3),
        "node-down after {detected:?}"
    );

    // The first live candidate, a, starts db; b does not.
    na.wait_entity("db", "failed over", |e| e["state"] == "running");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        nb.entity("db")["state"],
        "stopped",
        "db must not start twice"
    );
    let started = |n: &TestNode| {
        n.events()
            .iter()
            .filter(|e| e["entity"] == "db" && e["kind"] == "started")
            .count()
    };
    assert_eq!(
        started(&na) + started(&nb),
        1,
        "exactly one start in the cluster"
    );
    for n in [&na, &nb] {
        assert!(
            n.kinds_of("watch").contains(&"node-down".to_string()),
            "node-down fired on {}",
            n.name
        );
    }

    // c comes back (a new hamd adopts its state): node-up on the others.
    nc.launch().expect("c restarts");
    wait_until("a sees c up again", 10, || all_up(&na, &all));
    na.wait_events("node-up of c", |ev| {
        ev.iter()
            .any(|e| e["kind"] == "node-up" && e["detail"].as_str().is_some_and(|d| d.contains(&c)))
    });
}

/// Opens a raw QUIC connection to a node with the given client identity.
async fn raw_connect(
    identity: Option<&ham_overlay::TlsIdentity>,
    ca_dir: &Path,
    to: std::net::SocketAddr,
) -> Result<quinn::Connection, String> {
    let _ = ca_dir;
    let crypto = match identity {
        Some(id) => id.client_config().map_err(|e| e.to_string())?,
        None => {
            // No client certificate at all (and no check of the server's).
            let mut c =
                rustls::ClientConfig::builder_with_provider(ham_overlay::identity::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| e.to_string())?
                    .dangerous()
                    .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer))
                    .with_no_client_auth();
            c.alpn_protocols = vec![ham_overlay::identity::ALPN.to_vec()];
            c
        }
    };
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| e.to_string())?;
    let mut ep =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    ep.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
    ep.connect(to, "ham-mesh")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())
}

/// Sends a valid hello as `name`; returns the node's answer, or why there was none.
async fn hello(conn: &quinn::Connection, name: &str) -> Result<ham_overlay::wire::Hello, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let h = ham_overlay::wire::Hello {
        version: ham_overlay::wire::VERSION,
        name: name.into(),
        advertise: "127.0.0.1:1".into(),
        incarnation: 1,
    };
    send.write_all(&h.encode())
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    tokio::time::timeout(
        Duration::from_secs(5),
        ham_overlay::wire::Hello::read(&mut recv),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| e.to_string())
}

/// Connects as a member in good standing, opens a stream, writes `bytes` on it, and
/// says whether the node closed the connection within 5 s.
async fn stream_is_cut_off(
    id: &ham_overlay::TlsIdentity,
    ca_dir: &Path,
    to: std::net::SocketAddr,
    bytes: &[u8],
) -> bool {
    let conn = raw_connect(Some(id), ca_dir, to).await.expect("handshake");
    hello(&conn, "evil").await.expect("answered");
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    send.write_all(bytes).await.expect("written");
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .is_ok()
}

/// Reads one frame of an event feed (length, then a `FeedFrame`), within 5 s.
async fn read_feed_frame(recv: &mut quinn::RecvStream) -> Option<ham_proto::feed_frame::Item> {
    let read = async {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut body).await.ok()?;
        let frame: ham_proto::FeedFrame = ham_proto::Message::decode(&body[..]).ok()?;
        frame.item
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ham_overlay::identity::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn load(dir: &Path, name: &str) -> ham_overlay::TlsIdentity {
    ham_overlay::TlsIdentity::load(&ham_overlay::IdentityFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        ca: dir.join("ca.crt"),
    })
    .expect("identity loads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_garbage_are_cut_off_while_the_mesh_carries_on() {
    let certs_dir = ham_tests::Scratch::new("certs");
    let other_ca = ham_tests::Scratch::new("other-ca");
    let [a, b, _] = names("g");
    certs(&certs_dir.path, &[&a, &b, "evil", "liar"]);
    certs(&other_ca.path, &[&b]);
    let port = port();
    let g = "[[entity]]\nname = \"g\"\nglobal = true\n";
    let na = node(&certs_dir.path, &a, 2, port, None, Some(g));
    let nb = node(&certs_dir.path, &b, 3, port, Some((2, port)), None);
    wait_until("a and b up", 10, || all_up(&na, &[&a, &b]));
    let target: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().expect("addr");

    // A certificate from another CA, even for a member's name: nothing but a close.
    let outsider = load(&other_ca.path, &b);
    if let Ok(conn) = raw_connect(Some(&outsider), &other_ca.path, target).await {
        assert!(
            hello(&conn, &b).await.is_err(),
            "another CA's certificate was answered"
        );
    }
    // No client certificate at all.
    if let Ok(conn) = raw_connect(None, &certs_dir.path, target).await {
        assert!(
            hello(&conn, "anon").await.is_err(),
            "a client without certificate was answered"
        );
    }
    // A cluster certificate for another name than the one claimed.
    let liar = load(&certs_dir.path, "liar");
    let conn = raw_connect(Some(&liar), &certs_dir.path, target)
        .await
        .expect("handshake");
    assert!(
        hello(&conn, &b).await.is_err(),
        "a peer claiming another's name was answered"
    );

    // A member in good standing that then sends garbage is cut off.
    let evil = load(&certs_dir.path, "evil");
    let conn = raw_connect(Some(&evil), &certs_dir.path, target)
        .await
        .expect("handshake");
    let answer = hello(&conn, "evil")
        .await
        .expect("a valid hello is answered");
    assert_eq!(answer.name, a);
    conn.send_datagram(vec![0xff; 200].into())
        .expect("datagram sent");
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(closed.is_ok(), "the garbage sender was not cut off");
    // A stream with an unknown tag is cut off too.
    assert!(
        stream_is_cut_off(&evil, &certs_dir.path, target, b"Xgarbage").await,
        "an unknown stream tag was not cut off"
    );
    // An event feed that asks with more than a request may hold is cut off.
    let mut oversized = vec![ham_overlay::wire::TAG_FEED];
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(
        stream_is_cut_off(&evil, &certs_dir.path, target, &oversized).await,
        "an oversized feed request was not cut off"
    );
    // So is one whose request does not decode.
    let mut garbage = vec![ham_overlay::wire::TAG_FEED, 0, 0, 0, 8];
    garbage.extend_from_slice(&[0xff; 8]);
    assert!(
        stream_is_cut_off(&evil, &certs_dir.path, target, &garbage).await,
        "an undecodable feed request was not cut off"
    );
    // A well-formed one is answered: accepted, then the node's events as they come.
    let conn = raw_connect(Some(&evil), &certs_dir.path, target)
        .await
        .expect("handshake");
    hello(&conn, "evil").await.expect("answered");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let req = ham_proto::SubscribeRequest {
        kinds: vec!["raise".into()],
        follow: true,
        ..Default::default()
    };
    let body = ham_proto::Message::encode_to_vec(&req);
    let mut frame = vec![ham_overlay::wire::TAG_FEED];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    send.write_all(&frame).await.expect("written");
    let accepted = read_feed_frame(&mut recv).await;
    assert!(
        matches!(&accepted, Some(ham_proto::feed_frame::Item::Status(s)) if s.code == 0),
        "{accepted:?}"
    );
    na.ham(&["raise", "g", "over the feed"]);
    match read_feed_frame(&mut recv).await {
        Some(ham_proto::feed_frame::Item::Event(e)) => {
            assert_eq!((e.node.as_str(), e.kind.as_str()), (a.as_str(), "raise"));
            assert_eq!(e.detail, "severity 0: over the feed");
        }
        other => panic!("expected the raise, got {other:?}"),
    }

    // The others carry on.
    let remote: Value =
        serde_json::from_str(&na.ham(&["--node", &b, "status", "--json"])).expect("json");
    assert_eq!(remote["node"], b.as_str());
    assert!(all_up(&nb, &[&a, &b]));
    assert!(!states(&na).iter().any(|(n, _)| n == "liar"));
}

#[test]
fn a_failover_singleton_keeps_one_copy_and_is_restored_when_its_holder_dies() {
    let certs_dir = ham_tests::Scratch::new("certs");
    let [a, b, c] = names("s");
    certs(&certs_dir.path, &[&a, &b, &c]);
    // b and c both start db, as two sides of a healed partition would have; the
    // failover that declares db a singleton (candidates b, then c) never fires.
    let watch = format!(
        r#"
[[entity]]
name = "watch"
global = true
[[entity.condition]]
on = "node-down"
node = "{a}"
action = [{{ do = "failover", entity = "db", candidates = ["{b}", "{c}"] }}]
"#
    );
    let holder = format!("[[entity]]\nname = \"db\"\ncommand = [\"sleep\", \"300\"]\n{watch}");
    let port = port();
    let na = node(&certs_dir.path, &a, 2, port, None, Some(&watch));
    let mut nb = node(&certs_dir.path, &b, 3, port, Some((2, port)), Some(&holder));
    let mut nc = node(&certs_dir.path, &c, 4, port, Some((2, port)), Some(&holder));
    let all = [a.as_str(), b.as_str(), c.as_str()];
    for n in [&na, &nb, &nc] {
        wait_until("every node sees every other up", 10, || all_up(n, &all));
    }

    // c ranks after b: it stops its copy; b keeps its own.
    nc.wait_entity("db", "c's surplus copy stopped", |e| {
        e["state"] == "stopped"
    });
    let on_b = nb.entity("db");
    assert_eq!(on_b["state"], "running", "the best-ranked copy stays");
    assert!(
        nc.kinds_of("db").contains(&"singleton".to_string()),
        "c says why it stopped db"
    );
    let db_on_b = on_b["pid"].as_i64().expect("pid") as i32;
    nb.track(db_on_b);

    // b dies with its copy. No condition watches b, yet db must run somewhere: on c,
    // the only live candidate, started once.
    nb.kill_node();
    let restored = nc.wait_entity("db", "db restored on c", |e| e["state"] == "running");
    assert!(restored["pid"].as_i64().is_some_and(|p| p > 0));
    std::thread::sleep(Duration::from_millis(500));
    let starts = nc
        .events()
        .iter()
        .filter(|e| e["entity"] == "db" && e["kind"] == "started")
        .count();
    assert_eq!(starts, 2, "c started db at boot and once more on restore");
}

#[test]
fn a_remote_entity_is_watched_and_restarted_across_the_mesh() {
    let certs_dir = ham_tests::Scratch::new("certs");
    let [a, b, _] = names("r");
    certs(&certs_dir.path, &[&a, &b]);
    // On b: web, restarted by b itself when it dies.
    let on_b = "[[entity]]\nname = \"web\"\ncommand = [\"sleep\", \"300\"]\nrestart = true\n";
    // On a: web@b watched as `webb`; its death is told, a raise there restarts it.
    let on_a = format!(
        r#"
[[entity]]
name = "webb"
remote = "web@{b}"
[[entity.condition]]
on = "death"
action = [{{ do = "notify", message = "web died on b" }}]
[[entity.condition]]
on = "raise"
action = [{{ do = "restart" }}]
"#
    );
    let port = port();
    let na = node(&certs_dir.path, &a, 2, port, None, Some(&on_a));
    let mut nb = node(&certs_dir.path, &b, 3, port, Some((2, port)), Some(on_b));
    for n in [&na, &nb] {
        wait_until("a and b see each other up", 10, || {
            all_up(n, &[a.as_str(), b.as_str()])
        });
    }
    let mut na = na;
    assert_eq!(na.entity("webb")["state"], "remote");
    // The subscription from a to b is made within a second of the entity's addition.
    std::thread::sleep(Duration::from_millis(1500));

    // web dies on b: b restarts it; a's webb fires `death`.
    let first = nb.entity("web")["pid"].as_i64().expect("pid") as i32;
    nb.track(first);
    unsafe_kill(first);
    na.wait_events("death of web@b seen on a", |ev| {
        ev.iter().any(|e| {
            e["entity"] == "webb"
                && e["kind"] == "death"
                && e["detail"].as_str().is_some_and(|d| d.contains(&b))
        }) && ev
            .iter()
            .any(|e| e["kind"] == "notify" && e["detail"] == "web died on b")
    });
    let second = nb.wait_entity("web", "restarted by b", |e| {
        e["pid"]
            .as_i64()
            .is_some_and(|p| p > 0 && p != i64::from(first))
    })["pid"]
        .as_i64()
        .expect("pid") as i32;
    nb.track(second);

    // A detector raises on b: a's condition restarts web on b, through the mesh.
    nb.ham(&["raise", "web", "slow answers"]);
    let third = nb.wait_entity("web", "restarted from a", |e| {
        e["pid"]
            .as_i64()
            .is_some_and(|p| p > 0 && p != i64::from(second))
    });
    nb.track(third["pid"].as_i64().expect("pid") as i32);
    assert!(
        na.kinds_of("webb").contains(&"raise".to_string()),
        "a saw the raise"
    );

    // b dies altogether: that is web@b's death too.
    nb.kill_node();
    na.wait_events("death of web@b when b is down", |ev| {
        ev.iter().any(|e| {
            e["entity"] == "webb"
                && e["kind"] == "death"
                && e["detail"].as_str().is_some_and(|d| d.contains("is down"))
        })
    });
}

fn unsafe_kill(pid: i32) {
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -9 {pid}");
}

#[test]
fn cluster_subscribers_resume_after_a_reconnect_and_are_told_of_gaps() {
    use ham::Subscription;
    use tokio_stream::StreamExt;
    let certs_dir = ham_tests::Scratch::new("certs");
    let [a, b, _] = names("e");
    certs(&certs_dir.path, &[&a, &b]);
    let port = port();
    let g = "[[entity]]\nname = \"g\"\nglobal = true\n";
    let mut na = node(&certs_dir.path, &a, 2, port, None, None);
    let nb = node(&certs_dir.path, &b, 3, port, Some((2, port)), Some(g));
    for n in [&na, &nb] {
        wait_until("a and b see each other up", 10, || {
            all_up(n, &[a.as_str(), b.as_str()])
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut on_a = rt
        .block_on(ham::Client::connect(&na.socket))
        .expect("a answers");
    let mut on_b = rt
        .block_on(ham::Client::connect(&nb.socket))
        .expect("b answers");
    let sub = Subscription {
        entities: vec!["g".into()],
        kinds: vec!["raise".into(), "gap".into()],
        follow: true,
        nodes: "all".into(),
        ..Subscription::default()
    };
    let mut events = rt.block_on(on_a.subscribe(sub)).expect("subscribes");
    let mut next = |what: &str| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .unwrap_or_else(|_| panic!("{what}: no event within 10 s"))
                .expect("stream open")
                .expect("an event")
        })
    };
    // The subscription reaches b a moment after it is made.
    std::thread::sleep(Duration::from_millis(500));
    let mut raise = |from: usize, to: usize| {
        for i in from..to {
            rt.block_on(on_b.raise("g", 0, &format!("r{i}")))
                .expect("raise on b");
        }
    };
    raise(0, 5);
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next("before the takeover"));
    }
    // a's HAM dies: the stream breaks; b goes on publishing meanwhile; the client
    // reconnects to a's new HAM and resumes after the last event it got from b.
    na.kill_ham();
    raise(5, 10);
    for _ in 0..5 {
        seen.push(next("after the takeover"));
    }
    let details: Vec<&str> = seen.iter().map(|e| e.detail.as_str()).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("severity 0: r{i}")).collect();
    assert_eq!(details, expected, "every event once, in order, none lost");
    assert!(seen.iter().all(|e| e.node == b && e.kind == "raise"));
    assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq));

    // A subscriber that comes back after b's replay buffer (4,096 events) moved on is
    // told so explicitly, then gets what is still there.
    let first = seen[0].seq;
    raise(10, 4_300);
    let mut api = rt
        .block_on(ham::Client::connect(&na.socket))
        .expect("a answers");
    let req = ham::ham_proto::SubscribeRequest {
        entities: vec!["g".into()],
        nodes: "all".into(),
        resume: [(b.clone(), first)].into_iter().collect(),
        ..Default::default()
    };
    let replay: Vec<ham::ham_proto::Event> = rt.block_on(async {
        let mut s = api
            .api()
            .subscribe(req)
            .await
            .expect("subscribes")
            .into_inner();
        let mut out = Vec::new();
        while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(5), s.message()).await
        {
            out.push(e);
        }
        out
    });
    let from_b: Vec<&ham::ham_proto::Event> = replay.iter().filter(|e| e.node == b).collect();
    assert!(!from_b.is_empty(), "b's replay reached a");
    assert_eq!(
        from_b[0].kind, "gap",
        "first comes the gap: {:?}",
        from_b[0]
    );
    assert!(
        from_b
            .last()
            .is_some_and(|e| e.detail == "severity 0: r4299"),
        "and then the replay up to the last event: {:?}",
        from_b.last()
    );
}

/// Node a, and node b publishing: a client on a follows every node's `started`
/// events (`--node all`), and b has had a first life (a start numbered about 16, after
/// events the subscriber does not want), which the client resumes after.
struct RestartedPublisher {
    na: TestNode,
    nb: TestNode,
    b: String,
    rt: tokio::runtime::Runtime,
    events: std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<ham::ham_proto::Event, ham::ClientError>>>,
    >,
    _certs: ham_tests::Scratch,
}

impl RestartedPublisher {
    const ENTITY_G: &str = "[[entity]]\nname = \"g\"\nglobal = true\n";

    fn start(tag: &str) -> RestartedPublisher {
        let certs_dir = ham_tests::Scratch::new("certs");
        let [a, b, _] = names(tag);
        certs(&certs_dir.path, &[&a, &b]);
        let port = port();
        let na = node(&certs_dir.path, &a, 2, port, None, None);
        let nb = node(
            &certs_dir.path,
            &b,
            3,
            port,
            Some((2, port)),
            Some(Self::ENTITY_G),
        );
        for n in [&na, &nb] {
            wait_until("a and b see each other up", 10, || {
                all_up(n, &[a.as_str(), b.as_str()])
            });
        }
        let rt = ham_tests::runtime();
        let mut on_a = rt
            .block_on(ham::Client::connect(&na.socket))
            .expect("a answers");
        let sub = ham::Subscription {
            kinds: vec!["started".into()],
            follow: true,
            nodes: "all".into(),
            ..ham::Subscription::default()
        };
        let events = Box::pin(rt.block_on(on_a.subscribe(sub)).expect("subscribes"));
        let mut p = RestartedPublisher {
            na,
            nb,
            b,
            rt,
            events,
            _certs: certs_dir,
        };
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..10 {
            p.nb.ham(&["raise", "g", &format!("r{i}")]);
        }
        p.nb.ham(&["entity", "add", "w", "--", "/bin/sleep", "1000"]);
        let first = p.next_start_from_b().expect("b's first start");
        assert_eq!(first.entity, "w");
        p
    }

    /// b's next `started` event, or None after 15 s without one.
    fn next_start_from_b(&mut self) -> Option<ham::ham_proto::Event> {
        use tokio_stream::StreamExt;
        loop {
            let events = &mut self.events;
            let e = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(15), events.next())
                    .await
                    .ok()
                    .map(|e| e.expect("stream open").expect("an event"))
            })?;
            if e.node == self.b && e.kind == "started" {
                return Some(e);
            }
        }
    }

    /// b's config for its new life: ten entities, whose starts are numbered from about
    /// 13 on, so that b is past 30 before the mesh is up.
    fn new_life() -> String {
        let mut config = Self::ENTITY_G.to_string();
        for i in 0..10 {
            config.push_str(&format!(
                "[[entity]]\nname = \"n{i}\"\ncommand = [\"/bin/sleep\", \"1000\"]\n"
            ));
        }
        config
    }

    /// Every start of b's new life reaches the client on a.
    fn assert_the_new_life_arrives(&mut self) {
        let mut started: Vec<String> = (0..10)
            .map_while(|_| self.next_start_from_b())
            .map(|e| e.entity)
            .collect();
        started.sort();
        let mut expected: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
        expected.sort();
        assert_eq!(started, expected, "every start of b's new life reached a");
    }
}

/// A node restarted with a new store numbers its events from 1 again, and may have
/// numbered past the last event a subscriber elsewhere got from it before that
/// subscriber reconnects: the subscriber still gets its first events, not only those
/// numbered after its old last one (the cluster test's rolling restart lost b's
/// `started` event so, now and then).
#[test]
fn a_subscriber_gets_the_first_events_of_a_node_restarted_with_a_new_store() {
    let mut p = RestartedPublisher::start("n");
    p.nb.restart_with_new_store(&RestartedPublisher::new_life());
    p.assert_the_new_life_arrives();
}

/// The same when the client's own hamd changes hands meanwhile: the new HAM's fan-out
/// knows of b's events only what the client's resume map says (numbers and times).
#[test]
fn a_client_resuming_across_a_takeover_gets_the_first_events_of_a_node_restarted_with_a_new_store()
{
    let mut p = RestartedPublisher::start("q");
    p.nb.stop_discarding_store();
    p.na.kill_ham();
    std::thread::sleep(Duration::from_millis(1000));
    p.nb.relaunch_with_config(&RestartedPublisher::new_life());
    p.assert_the_new_life_arrives();
}

#[test]
fn a_node_that_stalls_does_not_blame_its_peers() {
    let certs_dir = ham_tests::Scratch::new("certs");
    let [a, b, c] = names("t");
    certs(&certs_dir.path, &[&a, &b, &c]);
    let port = port();
    let mut na = node(&certs_dir.path, &a, 2, port, None, None);
    let nb = node(&certs_dir.path, &b, 3, port, Some((2, port)), None);
    let nc = node(&certs_dir.path, &c, 4, port, Some((2, port)), None);
    let all = [a.as_str(), b.as_str(), c.as_str()];
    for n in [&na, &nb, &nc] {
        wait_until("every node sees every other up", 10, || all_up(n, &all));
    }
    // a's HAM is frozen for longer than a probe may wait for its answer, again and
    // again: its timers are all overdue when it runs again, with its peers' answers
    // already waiting in its socket. Its peers did answer; a must read those answers
    // before it judges anyone.
    let (ham, _, _) = na.pair();
    for _ in 0..12 {
        ham_tests::kill(ham, libc_sig::STOP);
        std::thread::sleep(Duration::from_millis(180));
        ham_tests::kill(ham, libc_sig::CONT);
        std::thread::sleep(Duration::from_millis(400));
    }
    let blamed: Vec<Value> = na
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "node-suspect" || e["kind"] == "node-down")
        .collect();
    assert!(
        blamed.is_empty(),
        "a blamed its peers for its own stall: {blamed:?}"
    );
    // The others may have suspected a (it did not answer while frozen), but a's
    // refutation reached them in time: nobody was declared down.
    for n in [&nb, &nc] {
        assert!(
            n.events().iter().all(|e| e["kind"] != "node-down"),
            "{} declared a node down",
            n.name
        );
    }
    for n in [&na, &nb, &nc] {
        assert!(all_up(n, &all), "{} does not see all up", n.name);
    }
}

/// Signal numbers for `ham_tests::kill`.
mod libc_sig {
    pub const STOP: i32 = 19;
    pub const CONT: i32 = 18;
}
