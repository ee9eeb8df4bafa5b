//! The floor: this harness as the bare parent of its children. A crash is a SIGKILL,
//! a waitpid and a spawn of the next child, with nothing else in between; no supervisor
//! can restart faster than this.

use super::{Kind, Supervisor, Workload};
use anyhow::Context;
use std::process::{Child, Command, Stdio};

/// The harness's own children.
pub struct Floor {
    w: Workload,
    children: Vec<Child>,
}

impl Floor {
    fn spawn(w: &Workload) -> anyhow::Result<Child> {
        let (prog, args) = w.argv.split_first().context("empty command")?;
        Command::new(prog)
            .args(args)
            .envs(w.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot spawn {prog}"))
    }

    /// Spawns the workload's processes.
    pub fn start(w: &Workload) -> anyhow::Result<Floor> {
        let mut f = Floor {
            w: w.clone(),
            children: Vec::new(),
        };
        for _ in 0..w.count {
            f.children.push(Floor::spawn(w)?);
        }
        Ok(f)
    }
}

impl Supervisor for Floor {
    fn kind(&self) -> Kind {
        Kind::Floor
    }

    fn own_pids(&self) -> anyhow::Result<Vec<i32>> {
        Ok(Vec::new())
    }

    fn supervised(&self) -> anyhow::Result<Vec<i32>> {
        Ok(self.children.iter().map(|c| c.id() as i32).collect())
    }

    fn crash(&mut self, pid: i32) -> anyhow::Result<()> {
        let i = self
            .children
            .iter()
            .position(|c| c.id() as i32 == pid)
            .with_context(|| format!("pid {pid} is not a child of the floor"))?;
        let mut old = self.children.swap_remove(i);
        let killed = old.kill();
        old.wait().context("waitpid")?;
        killed.context("kill")?;
        self.children.push(Floor::spawn(&self.w)?);
        Ok(())
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
