//! The store against real files in /dev/shm: round trips against a model, torn
//! writes, a writer SIGKILLed mid-commit, refusal of untrustworthy files, heartbeats.

use guardian::shm::pair_lock::{PairLock, Taken};
use guardian::shm::{BeatTable, CopyKey, Peeker, Store, StoreError, StoreParams, Txn};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

static N: AtomicU32 = AtomicU32::new(0);

/// A unique file under /dev/shm, removed on drop.
struct ShmFile(PathBuf);

impl ShmFile {
    fn new(tag: &str) -> ShmFile {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = PathBuf::from(format!(
            "/dev/shm/ham-guardian-test-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        ShmFile(p)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs test `name` of this test binary in a child process, with `env` set (which
/// makes that test play the child's part) and its stdout as given.
fn child_test(
    name: &str,
    env: (&str, &std::path::Path),
    stdout: std::process::Stdio,
) -> std::process::Child {
    let exe = std::env::current_exe().expect("test binary");
    std::process::Command::new(exe)
        .args(["--exact", name, "--nocapture"])
        .env(env.0, env.1)
        .stdout(stdout)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("child")
}

fn small() -> StoreParams {
    StoreParams {
        entity_slots: 8,
        arena_bytes: 64 * 1024,
        event_slots: 16,
        event_entry_bytes: 128,
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put(u32, Vec<u8>),
    Delete(u32),
    Node(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u32..=8, proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(s, b)| Op::Put(s, b)),
        (1u32..=8).prop_map(Op::Delete),
        proptest::collection::vec(any::<u8>(), 1..100).prop_map(Op::Node),
    ]
}

#[derive(Default, Clone, PartialEq, Debug)]
struct Model {
    node: Option<Vec<u8>>,
    entities: BTreeMap<u32, Vec<u8>>,
    events: BTreeMap<u64, Vec<u8>>,
}

fn apply(model: &mut Model, txn_ops: &[Op], seq: &mut u64, txn: &mut Txn) {
    for o in txn_ops {
        match o {
            Op::Put(s, b) => {
                txn.put_entity(*s, b.clone());
                model.entities.insert(*s, b.clone());
            }
            Op::Delete(s) => {
                txn.delete_entity(*s);
                model.entities.remove(s);
            }
            Op::Node(b) => {
                txn.put_node(b.clone());
                model.node = Some(b.clone());
            }
        }
    }
    *seq += 1;
    let ev = seq.to_le_bytes().to_vec();
    txn.push_event(*seq, ev.clone());
    model.events.insert(*seq, ev);
    while model.events.len() > 16 {
        let first = *model.events.keys().next().expect("non-empty");
        model.events.remove(&first);
    }
}

/// Reopens a store this process closed. It waits for the lock: a child forked by a
/// concurrent test shares our open file description (and so the flock) until it execs.
fn reopen(path: &std::path::Path) -> (Store, guardian::shm::Recovered) {
    Store::open_blocking(path).expect("reopens")
}

fn check(path: &std::path::Path, model: &Model) -> Store {
    let (store, rec) = reopen(path);
    assert_eq!(rec.node, model.node);
    assert_eq!(
        rec.entities,
        model.entities.clone().into_iter().collect::<Vec<_>>()
    );
    assert_eq!(
        rec.events,
        model.events.clone().into_iter().collect::<Vec<_>>()
    );
    store
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A warm Guardian's copy (peeked, unlocked, while the HAM commits) plus what the
    /// locked takeover re-reads equals the committed state, whatever came after the
    /// peek: more commits, deletions, a torn transaction.
    #[test]
    fn a_warm_copy_plus_the_locked_delta_equals_the_committed_state(
        before in proptest::collection::vec(proptest::collection::vec(op(), 0..6), 1..8),
        after in proptest::collection::vec(proptest::collection::vec(op(), 0..6), 0..8),
        torn in proptest::collection::vec(op(), 1..6),
        stop_after in 0usize..6,
    ) {
        let f = ShmFile::new("warm");
        let mut store = Store::create(&f.0, small()).expect("creates");
        let mut model = Model::default();
        let mut seq = 0;
        let commit = |ops: &[Op], store: &mut Store, model: &mut Model, seq: &mut u64| {
            let mut txn = Txn::new();
            apply(model, ops, seq, &mut txn);
            store.commit(&txn).expect("commits");
        };
        for ops in &before {
            commit(ops, &mut store, &mut model, &mut seq);
        }
        let peeker = Peeker::open(&f.0).expect("peeks without the lock");
        let peek = peeker.peek(|_, _| false);
        prop_assert_eq!(peek.present.len(), model.entities.len());
        let mut warm: BTreeMap<u32, (CopyKey, Vec<u8>)> =
            peek.changed.into_iter().map(|(s, k, b)| (s, (k, b))).collect();
        for ops in &after {
            commit(ops, &mut store, &mut model, &mut seq);
        }
        // A second peek brings only what changed.
        let again = peeker.peek(|s, k| warm.get(&s).is_some_and(|(w, _)| *w == k));
        for (s, k, b) in again.changed {
            warm.insert(s, (k, b));
        }
        warm.retain(|s, _| again.present.iter().any(|(p, _)| p == s));
        prop_assert_eq!(
            warm.iter().map(|(s, (_, b))| (*s, b.clone())).collect::<BTreeMap<_, _>>(),
            model.entities.clone()
        );
        let mut torn_txn = Txn::new();
        apply(&mut model.clone(), &torn, &mut seq.clone(), &mut torn_txn);
        store.commit_torn(&torn_txn, stop_after, b"junk");
        let locked = Store::wait_lock(&f.0).expect("locks");
        let (_, rec) = Store::open_known(locked, &|s, k| warm.get(&s).is_some_and(|(w, _)| *w == k))
            .expect("reads");
        let mut got: BTreeMap<u32, Vec<u8>> = rec.entities.into_iter().collect();
        for s in &rec.unchanged {
            got.insert(*s, warm[s].1.clone());
        }
        prop_assert_eq!(got, model.entities);
    }

    #[test]
    fn committed_transactions_round_trip_through_reopen(
        txns in proptest::collection::vec(proptest::collection::vec(op(), 0..6), 1..12)
    ) {
        let f = ShmFile::new("prop");
        let mut store = Store::create(&f.0, small()).expect("creates");
        let mut model = Model::default();
        let mut seq = 0;
        for ops in &txns {
            let mut txn = Txn::new();
            apply(&mut model, ops, &mut seq, &mut txn);
            store.commit(&txn).expect("commits");
        }
        drop(store);
        let store = check(&f.0, &model);
        // Arena accounting matches the live records after a rebuild.
        let live: u64 = model.entities.values().chain(model.node.iter())
            .map(|b| (b.len() as u64).max(1).div_ceil(64) * 64).sum();
        prop_assert_eq!(store.arena_used(), live);
    }

    #[test]
    fn a_torn_transaction_leaves_the_last_committed_state(
        committed in proptest::collection::vec(proptest::collection::vec(op(), 1..5), 1..6),
        torn in proptest::collection::vec(op(), 1..6),
        stop_after in 0usize..6,
        junk in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let f = ShmFile::new("torn");
        let mut store = Store::create(&f.0, small()).expect("creates");
        let mut model = Model::default();
        let mut seq = 0;
        for ops in &committed {
            let mut txn = Txn::new();
            apply(&mut model, ops, &mut seq, &mut txn);
            store.commit(&txn).expect("commits");
        }
        let mut shadow = model.clone();
        let mut torn_txn = Txn::new();
        let mut torn_seq = seq;
        apply(&mut shadow, &torn, &mut torn_seq, &mut torn_txn);
        store.commit_torn(&torn_txn, stop_after, &junk);
        // A torn event overwrote its ring entry: the oldest event may be lost, no more.
        let mut store = {
            let (store, rec) = reopen(&f.0);
            prop_assert_eq!(&rec.node, &model.node);
            prop_assert_eq!(rec.entities, model.entities.clone().into_iter().collect::<Vec<_>>());
            let newest: Vec<_> = model.events.clone().into_iter().skip(if model.events.len() == 16 { 1 } else { 0 }).collect();
            prop_assert!(rec.events.ends_with(&newest));
            store
        };
        // And the store goes on: a further commit is recovered.
        let mut txn = Txn::new();
        apply(&mut model, &[Op::Put(1, b"after".to_vec())], &mut seq, &mut txn);
        store.commit(&txn).expect("commits after the tear");
        drop(store);
        let (_, rec) = reopen(&f.0);
        prop_assert_eq!(rec.entities, model.entities.clone().into_iter().collect::<Vec<_>>());
    }
}

#[test]
fn a_writer_killed_at_random_moments_leaves_consistent_records() {
    if let Ok(path) = std::env::var("HAM_STORE_CRASH_CHILD") {
        crash_child(PathBuf::from(path));
    }
    let f = ShmFile::new("crash");
    let params = StoreParams {
        entity_slots: 16,
        arena_bytes: 256 * 1024,
        event_slots: 64,
        event_entry_bytes: 64,
    };
    drop(Store::create(&f.0, params).expect("creates"));
    let mut last = 0u64;
    let mut seed = 0x9e3779b97f4a7c15u64;
    for round in 0..120 {
        let mut child = child_test(
            "a_writer_killed_at_random_moments_leaves_consistent_records",
            ("HAM_STORE_CRASH_CHILD", &f.0),
            std::process::Stdio::null(),
        );
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(std::time::Duration::from_micros(2_000 + seed % 18_000));
        let _ = child.kill();
        let _ = child.wait();
        let (_, rec) = reopen(&f.0);
        let values: Vec<u64> = rec
            .entities
            .iter()
            .map(|(_, b)| u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
            .collect();
        if let Some(first) = values.first() {
            assert!(
                values.iter().all(|v| v == first),
                "round {round}: records disagree {values:?}"
            );
            assert_eq!(values.len(), 16, "round {round}");
            assert!(
                *first >= last,
                "round {round}: went back from {last} to {first}"
            );
            let node = u64::from_le_bytes(rec.node.expect("node")[..8].try_into().expect("8"));
            assert_eq!(node, *first, "round {round}: node record disagrees");
            last = *first;
        }
    }
    assert!(last > 0, "the child never committed");
}

/// The crash test's child: commits the same counter into every record, forever.
fn crash_child(path: PathBuf) -> ! {
    let (mut store, rec) = Store::open_blocking(&path).expect("child opens");
    let mut n = rec
        .node
        .map(|b| u64::from_le_bytes(b[..8].try_into().expect("8")))
        .unwrap_or(0);
    loop {
        n += 1;
        let mut txn = Txn::new();
        let mut body = n.to_le_bytes().to_vec();
        body.resize(100 + (n % 300) as usize, 0xab);
        for slot in 1..=16 {
            txn.put_entity(slot, body.clone());
        }
        txn.put_node(n.to_le_bytes().to_vec());
        txn.push_event(n, n.to_le_bytes().to_vec());
        store.commit(&txn).expect("child commits");
    }
}

#[test]
fn untrustworthy_files_are_refused_with_a_clear_error() {
    let f = ShmFile::new("bad");
    let mut store = Store::create(&f.0, small()).expect("creates");
    let mut txn = Txn::new();
    txn.put_entity(3, b"hello".to_vec());
    store.commit(&txn).expect("commits");
    assert!(
        matches!(Store::open(&f.0), Err(StoreError::Locked(_))),
        "second opener is refused"
    );
    drop(store);
    let original = std::fs::read(&f.0).expect("read");

    let mut bytes = original.clone();
    bytes[0] = b'X';
    std::fs::write(&f.0, &bytes).expect("write");
    let e = Store::open(&f.0).err().expect("refused");
    assert!(matches!(e, StoreError::BadMagic(_)), "{e}");
    assert!(e.to_string().contains("not a ham store"), "{e}");

    let mut bytes = original.clone();
    bytes[8] = 7;
    std::fs::write(&f.0, &bytes).expect("write");
    let e = Store::open(&f.0).err().expect("refused");
    assert!(e.to_string().contains("layout version 7 is unknown"), "{e}");

    let mut bytes = original.clone();
    bytes[16] ^= 1;
    std::fs::write(&f.0, &bytes).expect("write");
    assert!(matches!(
        Store::open(&f.0),
        Err(StoreError::HeaderChecksum(_))
    ));

    // Flip a byte of the committed blob: its checksum fails, loudly.
    let mut bytes = original.clone();
    let pos = bytes.windows(5).position(|w| w == b"hello").expect("blob");
    bytes[pos] = b'j';
    std::fs::write(&f.0, &bytes).expect("write");
    let e = Store::open(&f.0).err().expect("refused");
    assert!(matches!(e, StoreError::Corrupt { slot: 3, .. }), "{e}");

    std::fs::write(&f.0, &original).expect("write");
    reopen(&f.0);
}

#[test]
fn invalid_transactions_write_nothing() {
    let f = ShmFile::new("invalid");
    let mut store = Store::create(&f.0, small()).expect("creates");
    let mut txn = Txn::new();
    txn.put_entity(1, b"kept".to_vec());
    store.commit(&txn).expect("commits");
    for bad in [
        {
            let mut t = Txn::new();
            t.put_entity(2, b"x".to_vec());
            t.put_entity(99, b"y".to_vec());
            t
        },
        {
            let mut t = Txn::new();
            t.put_entity(2, b"x".to_vec());
            t.push_event(5, vec![0; 500]);
            t
        },
        {
            let mut t = Txn::new();
            t.put_entity(2, vec![0; 100 * 1024]);
            t
        },
    ] {
        assert!(store.commit(&bad).is_err());
    }
    drop(store);
    let (_, rec) = reopen(&f.0);
    assert_eq!(rec.entities, vec![(1, b"kept".to_vec())]);
}

#[test]
fn heartbeat_slots_count_beats_for_their_owner_only() {
    let f = ShmFile::new("beats");
    let ham = BeatTable::open_or_create(&f.0, 4).expect("creates");
    ham.claim(2, 77);
    let client = BeatTable::open(&f.0).expect("client maps");
    assert!(client.handle(2, 78).is_err(), "wrong token");
    let h = client.handle(2, 77).expect("own slot");
    assert!(!ham.observe(2));
    assert!(h.beat());
    assert!(ham.observe(2));
    assert!(!ham.observe(2), "no new beat");
    ham.beat(2);
    assert!(ham.observe(2));
    ham.claim(2, 99);
    assert!(!h.beat(), "reassigned slot");
    for s in [4, 1000, u32::MAX] {
        ham.beat(s);
        assert!(!ham.observe(s));
        assert_eq!(ham.owner(s), 0);
    }
    let mode = std::fs::metadata(&f.0).expect("meta");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o660
    );
}

#[test]
fn a_pair_lock_held_by_a_thread_that_exits_passes_on_as_owner_died() {
    let f = ShmFile::new("pairlock-thread");
    drop(Store::create(&f.0, small()).expect("creates"));
    let holder = PairLock::open(&f.0).expect("opens");
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        assert_eq!(holder.lock().expect("locks"), Taken::Free);
        held_tx.send(()).expect("tells");
        let _ = exit_rx.recv();
        // Exits holding it; the mapping stays alive (returned) for the kernel to mark.
        holder
    });
    held_rx.recv().expect("held");
    let waiter = PairLock::open(&f.0).expect("opens");
    assert_eq!(waiter.try_lock().expect("tries"), None, "a live holder");
    exit_tx.send(()).expect("tells");
    let _holder = t.join().expect("joins");
    assert_eq!(waiter.lock().expect("locks"), Taken::OwnerDied);
    waiter.unlock().expect("unlocks");
    assert_eq!(
        waiter.try_lock().expect("tries"),
        Some(Taken::Free),
        "consistent again"
    );
    waiter.unlock().expect("unlocks");
}

#[test]
fn a_pair_lock_held_by_a_process_killed_wakes_its_waiter() {
    if let Ok(path) = std::env::var("HAM_PAIR_LOCK_CHILD") {
        let lock = PairLock::open(std::path::Path::new(&path)).expect("child opens");
        lock.lock().expect("child locks");
        println!("held");
        loop {
            std::thread::park();
        }
    }
    let f = ShmFile::new("pairlock-process");
    drop(Store::create(&f.0, small()).expect("creates"));
    let mut child = child_test(
        "a_pair_lock_held_by_a_process_killed_wakes_its_waiter",
        ("HAM_PAIR_LOCK_CHILD", &f.0),
        std::process::Stdio::piped(),
    );
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains("held") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).expect("reads");
        assert!(n > 0, "the child ended before holding the lock");
    }
    let waiter = PairLock::open(&f.0).expect("opens");
    assert_eq!(waiter.try_lock().expect("tries"), None, "a live holder");
    let locked = std::thread::spawn(move || {
        let taken = waiter.lock().expect("locks");
        waiter.unlock().expect("unlocks");
        taken
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !locked.is_finished(),
        "the lock was taken from a live holder"
    );
    child.kill().expect("kills");
    let taken = locked.join().expect("joins");
    let _ = child.wait();
    assert_eq!(taken, Taken::OwnerDied);
}

#[test]
fn a_pair_lock_left_held_by_a_thread_that_is_gone_names_it_and_can_be_made_anew() {
    let f = ShmFile::new("pairlock-stale");
    drop(Store::create(&f.0, small()).expect("creates"));
    let path = f.0.clone();
    // The holder unmaps the lock before it exits: the kernel cannot mark it.
    let tid = std::thread::spawn(move || {
        let lock = PairLock::open(&path).expect("opens");
        assert_eq!(lock.lock().expect("locks"), Taken::Free);
        drop(lock);
        rustix::thread::gettid().as_raw_nonzero().get()
    })
    .join()
    .expect("joins");
    let lock = PairLock::open(&f.0).expect("opens");
    assert_eq!(lock.try_lock().expect("tries"), None, "still held");
    assert_eq!(lock.holder(), Some(tid));
    lock.remake().expect("remade");
    assert_eq!(lock.holder(), None);
    assert_eq!(lock.try_lock().expect("tries"), Some(Taken::Free));
    lock.unlock().expect("unlocks");
}

/// Bytes of memory the file really holds (tmpfs allocates a page on first touch).
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn reading_a_sparse_store_leaves_its_unused_directory_unallocated() {
    let f = ShmFile::new("sparse");
    let params = StoreParams {
        entity_slots: 16_384,
        ..small()
    };
    let mut store = Store::create(&f.0, params).expect("creates");
    let mut txn = Txn::new();
    txn.put_node(b"node".to_vec());
    txn.put_entity(3, b"near".to_vec());
    txn.put_entity(16_000, b"far".to_vec());
    store.commit(&txn).expect("commits");
    drop(store);
    let written = allocated_bytes(&f.0);

    // A Guardian's look, then a takeover's recovery: both find every record…
    let peek = Peeker::open(&f.0).expect("peeks").peek(|_, _| false);
    let found: Vec<(u32, Vec<u8>)> = peek.changed.into_iter().map(|(s, _, b)| (s, b)).collect();
    assert_eq!(
        found,
        vec![(3, b"near".to_vec()), (16_000, b"far".to_vec())]
    );
    let (_, recovered) = Store::open(&f.0).expect("opens");
    assert_eq!(recovered.node.as_deref(), Some(&b"node"[..]));
    assert_eq!(
        recovered.entities,
        vec![(3, b"near".to_vec()), (16_000, b"far".to_vec())]
    );
    // …and neither made tmpfs allocate the 1 MiB directory of 16,384 slots.
    let after = allocated_bytes(&f.0);
    assert!(
        after <= written + 64 * 1024,
        "reading allocated {} KiB of the file ({} KiB before)",
        after / 1024,
        written / 1024
    );
}
