//! ham: a private `hamd` whose config declares the workload's processes as entities
//! restarted on death (`restart = true`).

use super::{Kind, Supervisor, Workload};
use crate::hamd::{Bins, Hamd};
use crate::sys::Scratch;
use crate::sys::{all_procs, descendants};
use anyhow::Context;
use std::collections::HashSet;
use std::time::{Duration, Instant};

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

    /// The HAM and its Guardian, found in the process tree as the peers' processes
    /// are: asking the HAM (a `status` call) would map the code that answers it into
    /// the very process being measured.
    fn own_pids(&self) -> anyhow::Result<Vec<i32>> {
        let ham = self.hamd()?.started_pid().context("hamd was stopped")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let guardians: Vec<i32> = descendants(ham)
                .into_iter()
                .filter(|p| p.comm == "hamd" && p.ppid == ham)
                .map(|p| p.pid)
                .collect();
            if let [g] = guardians.as_slice() {
                return Ok(vec![ham, *g]);
            }
            anyhow::ensure!(Instant::now() < deadline, "no Guardian within 30 s");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The HAM's children other than its Guardian, from the process tree.
    fn supervised(&self) -> anyhow::Result<Vec<i32>> {
        let own: HashSet<i32> = self.own_pids()?.into_iter().collect();
        Ok(all_procs()
            .into_values()
            .filter(|p| own.contains(&p.ppid) && !own.contains(&p.pid) && p.state != 'Z')
            .map(|p| p.pid)
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
