//! Membership and failure detection: foca's SWIM, fed and drained by the mesh task.
//!
//! This module does no I/O: it turns foca's effects (send these bytes, arm this
//! timer) into values for the mesh task, and keeps the per-name view (up, suspect,
//! down) whose changes become `node-up` / `node-suspect` / `node-down` events.

use crate::NodeName;
use foca::{AccumulatingRuntime, Foca, Identity, OwnedNotification, PostcardCodec, State, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

/// A member as SWIM knows it: its name, where it listens, and which start of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshId {
    /// The node's name (also its foca address: one member per name).
    pub name: NodeName,
    /// Where it can be dialled (`host:port`, resolved at every dial).
    pub addr: String,
    /// Grows with every start of the node (and every rejoin after being declared
    /// down), so the newest identity wins.
    pub incarnation: u64,
}

impl Identity for MeshId {
    type Addr = NodeName;

    fn renew(&self) -> Option<Self> {
        Some(MeshId {
            incarnation: self.incarnation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeName {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// A member's state as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Answering probes.
    Up,
    /// Missed a probe; the cluster is checking it.
    Suspect,
    /// Declared dead by the cluster.
    Down,
}

impl MemberState {
    /// `up`, `suspect` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Up => "up",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        }
    }
}

/// One row of `ham nodes`.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    /// The node.
    pub name: NodeName,
    /// Its state.
    pub state: MemberState,
    /// Where it listens.
    pub addr: String,
    /// The QUIC connection's smoothed round-trip time, if connected.
    pub rtt: Option<Duration>,
    /// Time since anything was last received from it, if ever.
    pub last_contact: Option<Duration>,
    /// True for this node's own row.
    pub is_self: bool,
}

/// SWIM's timing: how often members are probed and how long a suspect has to answer.
/// The defaults detect a dead node in well under a second on a LAN.
#[derive(Clone, Copy, Debug)]
pub struct SwimTuning {
    /// One member probed per period.
    pub probe_period: Duration,
    /// How long a probe waits for its direct answer before asking others.
    pub probe_rtt: Duration,
    /// How long a suspect has to refute before it is declared down.
    pub suspect_to_down: Duration,
}

impl Default for SwimTuning {
    fn default() -> Self {
        SwimTuning {
            probe_period: Duration::from_millis(150),
            probe_rtt: Duration::from_millis(100),
            suspect_to_down: Duration::from_millis(350),
        }
    }
}

/// Largest SWIM packet: QUIC datagrams carry ~1160 bytes before path-MTU discovery.
pub const MAX_PACKET: usize = 1100;

/// A SWIM instance for `me` that knows no other member.
fn swim(me: MeshId, tuning: SwimTuning) -> Swim {
    let seed = me.incarnation ^ (me.name.as_str().len() as u64) << 32;
    Foca::new(
        me,
        config(tuning),
        StdRng::seed_from_u64(seed),
        PostcardCodec,
    )
}

fn config(t: SwimTuning) -> foca::Config {
    let mut c = foca::Config::simple();
    c.probe_period = t.probe_period;
    c.probe_rtt = t.probe_rtt;
    c.suspect_to_down_after = t.suspect_to_down;
    c.num_indirect_probes = NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN);
    c.max_transmissions = NonZeroU8::new(6).unwrap_or(NonZeroU8::MIN);
    c.max_packet_size = NonZeroUsize::new(MAX_PACKET).unwrap_or(NonZeroUsize::MIN);
    c.remove_down_after = Duration::from_secs(3600);
    c.notify_down_members = true;
    // Gossip keeps views converging; announcing to down members heals partitions.
    c.periodic_gossip = Some(foca::PeriodicParams {
        frequency: t.probe_period,
        num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
    });
    c.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::MIN,
    });
    c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(1),
        num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
    });
    c
}

/// What the mesh task must do after feeding foca.
#[derive(Debug, Default)]
pub struct Effects {
    /// Datagrams to send.
    pub send: Vec<(MeshId, bytes::Bytes)>,
    /// Timers to arm; each comes back through [`Membership::handle_timer`].
    pub timers: Vec<(Duration, SwimTimer)>,
    /// Members whose state changed, with the new state.
    pub changes: Vec<(MeshId, MemberState)>,
}

/// Why foca refused input.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SwimError {
    message: String,
    malformed: bool,
}

impl SwimError {
    fn malformed(message: String) -> SwimError {
        SwimError {
            message,
            malformed: true,
        }
    }

    /// True if the input was malformed (a peer to disconnect), not merely stale.
    pub fn is_malformed(&self) -> bool {
        self.malformed
    }
}

impl From<foca::Error> for SwimError {
    fn from(e: foca::Error) -> SwimError {
        let malformed = matches!(
            e,
            foca::Error::Decode(_) | foca::Error::MalformedPacket | foca::Error::DataTooBig
        );
        SwimError {
            message: e.to_string(),
            malformed,
        }
    }
}

/// A timer SWIM asked for, stamped with the SWIM instance that armed it (a timer of
/// an instance replaced by [`Membership`]'s fresh start is ignored).
#[derive(Debug)]
pub struct SwimTimer {
    epoch: u64,
    timer: Timer<MeshId>,
}

type Swim = Foca<MeshId, PostcardCodec, StdRng, foca::NoCustomBroadcast>;

/// The SWIM state machine with its view of each member.
///
/// A node that finds every other member down (it is alone, or on the small side of a
/// partition) starts SWIM afresh under a newer incarnation and forgets what it
/// believed about the others. Otherwise, once the partition heals, its stale
/// "X is down" would spread to the healthy side and make every X briefly down there
/// too (SWIM's down is final: X must rejoin), firing `node-down` for live nodes.
pub struct Membership {
    foca: Swim,
    runtime: AccumulatingRuntime<MeshId>,
    view: BTreeMap<NodeName, (MeshId, MemberState)>,
    tuning: SwimTuning,
    /// Which SWIM instance this is (grows with every fresh start).
    epoch: u64,
}

impl Membership {
    /// A membership of one: this node.
    pub fn new(me: MeshId, tuning: SwimTuning) -> Membership {
        Membership {
            foca: swim(me, tuning),
            runtime: AccumulatingRuntime::new(),
            view: BTreeMap::new(),
            tuning,
            epoch: 0,
        }
    }

    /// This node's current identity.
    pub fn me(&self) -> &MeshId {
        self.foca.identity()
    }

    /// Asks `peer` to let this node join.
    pub fn announce(&mut self, peer: MeshId) -> Result<Effects, SwimError> {
        let r = self.foca.announce(peer, &mut self.runtime);
        self.finish(r)
    }

    /// Feeds a datagram received from a peer.
    pub fn handle_data(&mut self, data: &[u8]) -> Result<Effects, SwimError> {
        if data.len() > MAX_PACKET {
            return Err(SwimError::malformed(format!(
                "datagram of {} bytes (at most {MAX_PACKET})",
                data.len()
            )));
        }
        let r = self.foca.handle_data(data, &mut self.runtime);
        self.finish(r)
    }

    /// Feeds a timer that fired.
    pub fn handle_timer(&mut self, t: SwimTimer) -> Result<Effects, SwimError> {
        if t.epoch != self.epoch {
            return Ok(Effects::default());
        }
        let r = self.foca.handle_timer(t.timer, &mut self.runtime);
        self.finish(r)
    }

    /// Members that are down: whom a node alone keeps announcing itself to.
    pub fn down_members(&self) -> impl Iterator<Item = &MeshId> {
        self.view
            .values()
            .filter(|(_, s)| *s == MemberState::Down)
            .map(|(id, _)| id)
    }

    /// Leaves the cluster gracefully (others see this node down at once).
    pub fn leave(&mut self) -> Effects {
        // Leaving consumes foca; a fresh runtime collects its last messages.
        let r = self.foca.leave_cluster(&mut self.runtime);
        self.finish(r).unwrap_or_default()
    }

    /// Every member this node has heard of, but itself.
    pub fn members(&self) -> impl Iterator<Item = (&MeshId, MemberState)> {
        self.view.values().map(|(id, s)| (id, *s))
    }

    /// The state of one member.
    pub fn state_of(&self, name: &NodeName) -> Option<MemberState> {
        self.view.get(name).map(|(_, s)| *s)
    }

    fn finish(&mut self, r: Result<(), foca::Error>) -> Result<Effects, SwimError> {
        let mut fx = Effects::default();
        while let Some((to, data)) = self.runtime.to_send() {
            fx.send.push((to, data));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            let epoch = self.epoch;
            fx.timers.push((after, SwimTimer { epoch, timer }));
        }
        while let Some(n) = self.runtime.to_notify() {
            match n {
                // Declared down while alive (a partition that healed): foca comes back
                // under a newer incarnation (`MeshId::renew`) rather than stay out.
                OwnedNotification::Rejoin(id) => {
                    tracing::warn!(
                        incarnation = id.incarnation,
                        "this node was declared down by the cluster; rejoined"
                    );
                }
                OwnedNotification::Idle => tracing::debug!("no other member is up"),
                _ => {}
            }
        }
        fx.changes = self.refresh_view();
        if self.foca.num_members() > 0 && self.view.values().all(|(_, s)| *s == MemberState::Down) {
            // What this instance would still send carries its stale beliefs.
            fx.send.clear();
            fx.timers.clear();
            self.start_afresh();
        }
        r.map(|()| fx).map_err(SwimError::from)
    }

    /// Replaces SWIM by a fresh instance under a newer incarnation that knows no one;
    /// the view keeps every member, down, until it is heard from again.
    fn start_afresh(&mut self) {
        let me = self.foca.identity();
        let me = MeshId {
            incarnation: me.incarnation + 1,
            ..me.clone()
        };
        tracing::info!(
            incarnation = me.incarnation,
            "every other member is down: SWIM starts afresh, forgetting who it saw down"
        );
        self.foca = swim(me, self.tuning);
        self.runtime = AccumulatingRuntime::new();
        self.epoch += 1;
    }

    /// Recomputes the per-name view from foca's members (the newest identity of each
    /// name) and returns what changed.
    fn refresh_view(&mut self) -> Vec<(MeshId, MemberState)> {
        // A member a fresh SWIM does not know (yet) stays in the view, down.
        let mut newest: BTreeMap<NodeName, (MeshId, MemberState)> = self
            .view
            .iter()
            .map(|(name, (id, _))| (name.clone(), (id.clone(), MemberState::Down)))
            .collect();
        for m in self.foca.iter_membership_state() {
            let state = match m.state() {
                State::Alive => MemberState::Up,
                State::Suspect => MemberState::Suspect,
                State::Down => MemberState::Down,
            };
            let id = m.id().clone();
            match newest.get(&id.name) {
                Some((old, _)) if old.incarnation > id.incarnation => {}
                _ => {
                    newest.insert(id.name.clone(), (id, state));
                }
            }
        }
        let mut changes = Vec::new();
        for (name, (id, state)) in &newest {
            if self.view.get(name).map(|(_, s)| *s) != Some(*state) {
                changes.push((id.clone(), *state));
            }
        }
        self.view = newest;
        changes
    }
}
