//! The node's place in the mesh: its settings (flags over `[mesh]` config), starting
//! the overlay, serving the control API to other nodes, and handing membership
//! changes to the node loop.

use crate::node::Msg;
use anyhow::Context;
use ham_overlay::{IdentityFiles, Mesh, MeshConfig, MeshEvent, NodeName, SwimTuning};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// Mesh settings as flags give them; each overrides the config's `[mesh]` value.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct MeshFlags {
    /// Join the mesh, listening on this UDP address (e.g. 0.0.0.0:7000).
    #[arg(long = "mesh-listen", value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Where other nodes reach this one (default: the listen address, or the host
    /// name and port when listening on every interface).
    #[arg(long = "mesh-advertise", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// A node to join through; repeatable.
    #[arg(long = "mesh-seed", value_name = "HOST:PORT")]
    pub seeds: Vec<String>,
    /// This node's certificate (from `ham cert issue`).
    #[arg(long = "mesh-cert", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This node's private key.
    #[arg(long = "mesh-key", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The cluster CA's certificate.
    #[arg(long = "mesh-ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl MeshFlags {
    /// Flags over config: the settings this node runs with (`None`: no mesh).
    pub fn resolve(
        &self,
        cfg: Option<&ham_core::config::MeshSettings>,
    ) -> anyhow::Result<Option<MeshFlags>> {
        let c = cfg.cloned().unwrap_or_default();
        let merged = MeshFlags {
            listen: self.listen.clone().or(c.listen),
            advertise: self.advertise.clone().or(c.advertise),
            seeds: if self.seeds.is_empty() {
                c.seeds
            } else {
                self.seeds.clone()
            },
            cert: self.cert.clone().or(c.cert.map(PathBuf::from)),
            key: self.key.clone().or(c.key.map(PathBuf::from)),
            ca: self.ca.clone().or(c.ca.map(PathBuf::from)),
        };
        if merged.listen.is_none() {
            if merged.cert.is_some() || !merged.seeds.is_empty() {
                anyhow::bail!("mesh settings given without --mesh-listen ADDR:PORT");
            }
            return Ok(None);
        }
        for (what, v) in [
            ("--mesh-cert", &merged.cert),
            ("--mesh-key", &merged.key),
            ("--mesh-ca", &merged.ca),
        ] {
            if v.is_none() {
                anyhow::bail!("the mesh needs {what} (mutual TLS is mandatory; see `ham cert`)");
            }
        }
        Ok(Some(merged))
    }

    /// The flags that give these settings to a Guardian.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |flag: &str, v: String| {
            a.push(flag.to_string());
            a.push(v);
        };
        if let Some(v) = &self.listen {
            push("--mesh-listen", v.clone());
        }
        if let Some(v) = &self.advertise {
            push("--mesh-advertise", v.clone());
        }
        for s in &self.seeds {
            push("--mesh-seed", s.clone());
        }
        for (flag, v) in [
            ("--mesh-cert", &self.cert),
            ("--mesh-key", &self.key),
            ("--mesh-ca", &self.ca),
        ] {
            if let Some(p) = v {
                push(flag, p.display().to_string());
            }
        }
        a
    }

    /// The overlay's configuration for node `name`.
    pub fn config(&self, name: &str) -> anyhow::Result<MeshConfig> {
        let name = NodeName::new(name).context("the mesh names nodes by DNS label")?;
        let listen = self.listen.as_deref().unwrap_or_default();
        let listen = listen
            .parse()
            .with_context(|| format!("--mesh-listen {listen:?} is not ADDR:PORT"))?;
        let need = |p: &Option<PathBuf>| p.clone().unwrap_or_default();
        Ok(MeshConfig {
            name,
            listen,
            advertise: self.advertise.clone(),
            seeds: self.seeds.clone(),
            identity: IdentityFiles {
                cert: need(&self.cert),
                key: need(&self.key),
                ca: need(&self.ca),
            },
            swim: SwimTuning::default(),
            max_datagrams_per_sec: 2_000,
        })
    }
}

/// Starts the mesh. After a takeover the dead HAM's UDP socket may linger for a few
/// milliseconds, so binding is retried briefly.
pub async fn start(cfg: MeshConfig) -> anyhow::Result<(Mesh, ham_overlay::MeshIncoming)> {
    let mut tries = 0;
    loop {
        match Mesh::start(cfg.clone()).await {
            Ok(m) => return Ok(m),
            Err(ham_overlay::MeshError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && tries < 100 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Feeds membership changes to the node loop.
pub fn forward_members(mut events: mpsc::UnboundedReceiver<MeshEvent>, tx: mpsc::Sender<Msg>) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if tx.send(Msg::Member(e)).await.is_err() {
                return;
            }
        }
    });
}
