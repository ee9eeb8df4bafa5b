//! ham: a private `hamd` whose config declares the workload's processes as entities
//! restarted on death (`restart = true`).

use super::{Kind, Supervisor, Workload};
use crate::hamd::{Bins, Hamd};
use crate::sys::Scratch;
use anyhow::Context;

/// A running `hamd` with its entities.
pub struct HamSut {
    hamd: Option<Hamd>,
    _dir: Scratch,
}

/// The config of `count` entities `e1`…, each running `argv`, restarted on death when
/// `restart`.
pub fn entities_config(count: usize, argv: &[String], restart: bool) -> String {
    let command: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    let mut c = String::new();
    for i in 1..=count {
        c.push_str(&format!(
            "[[entity]]\nname = \"e{i}\"\ncommand = [{}]\n",
            command.join(", ")
        ));
        if restart {
            c.push_str("restart = true\n");
        }
    }
    c
}

impl HamSut {
    /// Starts `hamd --config` with the workload's entities.
    pub fn start(bins: &Bins, w: &Workload) -> anyhow::Result<HamSut> {
        let dir = Scratch::new("ham")?;
        let config = entities_config(w.count, &w.argv, true);
        let hamd = Hamd::start(bins, &dir, &config, w.count + 16, &w.env)?;
        Ok(HamSut {
            hamd: Some(hamd),
            _dir: dir,
        })
    }

    fn hamd(&self) -> anyhow::Result<&Hamd> {
        self.hamd.as_ref().context("hamd was stopped")
    }
}

impl Supervisor for HamSut {
    fn kind(&self) -> Kind {
        Kind::Ham
    }

    fn own_pids(&self) -> anyhow::Result<Vec<i32>> {
        let (h, g) = self.hamd()?.pair()?;
        Ok(vec![h, g])
    }

    fn supervised(&self) -> anyhow::Result<Vec<i32>> {
        Ok(self
            .hamd()?
            .status()?
            .entities
            .iter()
            .filter(|e| e.pid > 0)
            .map(|e| e.pid)
            .collect())
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        drop(self.hamd.take());
        Ok(())
    }
}

impl Drop for HamSut {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
