//! A self-attached worker: attaches to the local hamd with a heartbeat contract,
//! beats through shared memory while it works, reports its state, then detaches.
//!
//! Run a node, then: `cargo run --example worker -- --socket /tmp/ham.sock`
//! and watch `ham events --follow` in another terminal.

use ham::{Client, HeartbeatContract};
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut client = match (args.next().as_deref(), args.next()) {
        (Some("--socket"), Some(path)) => Client::connect(path).await?,
        _ => Client::connect_default().await?,
    };
    let me = client
        .attach_self(
            "example-worker",
            Some(HeartbeatContract::every_ms(200, 2, 5)),
        )
        .await?;
    println!("attached as {}; working for 2 s", me.name());
    client.set_state(me.name(), "working").await?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100)); // a unit of work
        me.heartbeat().beat(); // shared memory: no system call
    }
    println!("going silent for 1 s: heartbeat-missed-low fires");
    tokio::time::sleep(Duration::from_secs(1)).await;
    client
        .raise(me.name(), 3, "example detector report")
        .await?;
    client.set_state(me.name(), "done").await?;
    client.detach(me.name()).await?;
    println!("detached");
    Ok(())
}
