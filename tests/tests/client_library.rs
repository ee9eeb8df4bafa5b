//! The `ham` client library against a real `hamd`: self-attach, shared-memory
//! heartbeats, raise, state, subscribe, detach, and status codes.

use ham::{Client, HeartbeatContract, Subscription};
use ham_tests::TestNode;
use std::time::Duration;
use tokio_stream::StreamExt;

#[tokio::test]
async fn a_self_attached_process_beats_through_shared_memory_and_detaches() {
    let mut node = TestNode::start("lib");
    let mut client = Client::connect(&node.socket).await.expect("connects");
    let mut events = client
        .subscribe(Subscription {
            entities: vec!["me".into()],
            follow: true,
            ..Default::default()
        })
        .await
        .expect("subscribes");
    let me = client
        .attach_self("me", Some(HeartbeatContract::every_ms(50, 2, 4)))
        .await
        .expect("attaches");
    for _ in 0..10 {
        assert!(me.heartbeat().beat());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let st = node.entity("me");
    assert_eq!(st["kind"], "self");
    assert_eq!(st["pid"], std::process::id());
    assert_eq!(st["missed_beats"], 0, "{st}");
    // Silence: the low condition fires.
    tokio::time::sleep(Duration::from_millis(250)).await;
    client.raise("me", 3, "disk slow").await.expect("raise");
    client.set_state("me", "degraded").await.expect("state");
    client.detach("me").await.expect("detach");
    let mut kinds = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(5), events.next()).await {
        kinds.push(e.kind.clone());
        if e.kind == "entity-removed" {
            break;
        }
    }
    for k in [
        "entity-added",
        "attach",
        "heartbeat-missed-low",
        "raise",
        "state",
        "detach",
        "entity-removed",
    ] {
        assert!(kinds.contains(&k.to_string()), "{k} missing from {kinds:?}");
    }
    // The slot was released: the old handle no longer beats.
    assert!(!me.heartbeat().beat());
}

#[tokio::test]
async fn status_codes_reach_the_library_unchanged() {
    let node = TestNode::start("codes");
    let mut client = Client::connect(&node.socket).await.expect("connects");
    let err = client.raise("nobody", 1, "x").await.unwrap_err();
    match err {
        ham::ClientError::Status(s) => assert_eq!(s.code(), tonic::Code::NotFound),
        other => panic!("{other}"),
    }
    let err = client.attach_self("bad name", None).await.unwrap_err();
    match err {
        ham::ClientError::Status(s) => assert_eq!(s.code(), tonic::Code::InvalidArgument),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_subscriber_resumes_from_a_sequence_number_and_filters_by_kind() {
    let node = TestNode::start("resume");
    node.ham(&["entity", "global", "g"]);
    for i in 0..5 {
        node.ham(&["raise", "g", &format!("r{i}")]);
    }
    let mut client = Client::connect(&node.socket).await.expect("connects");
    let all: Vec<_> = client
        .subscribe(Subscription {
            from_seq: 1,
            ..Default::default()
        })
        .await
        .expect("subscribes")
        .collect::<Vec<_>>()
        .await;
    let third_raise = all
        .iter()
        .filter_map(|e| e.as_ref().ok())
        .filter(|e| e.kind == "raise")
        .nth(2)
        .expect("third raise")
        .seq;
    let rest: Vec<String> = client
        .subscribe(Subscription {
            kinds: vec!["raise".into()],
            from_seq: third_raise,
            ..Default::default()
        })
        .await
        .expect("subscribes")
        .filter_map(|e| e.ok().map(|e| e.detail))
        .collect()
        .await;
    assert_eq!(rest, ["severity 0: r2", "severity 0: r3", "severity 0: r4"]);
}
