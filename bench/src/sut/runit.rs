//! runit: `runsvdir` on a directory of N service directories, one `runsv` each.
//! runsvdir supervises at most 1,000 services (a compile-time limit).

use super::{Kind, Supervisor, Tree, Workload, write_run};
use crate::sys::{SIGHUP, Scratch};
use std::process::Command;

/// A running runit supervision tree.
pub struct Runit {
    tree: Tree,
    _dir: Scratch,
}

impl Runit {
    /// Writes the service directories and starts `runsvdir`.
    pub fn start(w: &Workload) -> anyhow::Result<Runit> {
        anyhow::ensure!(w.count <= 1000, "runsvdir supervises at most 1000 services");
        let dir = Scratch::new("runit")?;
        let sv = dir.subdir("service")?;
        for i in 0..w.count {
            let svc = sv.join(format!("svc{i}"));
            std::fs::create_dir_all(&svc)?;
            write_run(&svc, &w.argv)?;
        }
        let mut cmd = Command::new("runsvdir");
        cmd.arg(&sv);
        let tree = Tree::spawn(cmd, w, &dir.join("runsvdir.log"), &["runsv"], SIGHUP)?;
        Ok(Runit { tree, _dir: dir })
    }
}

impl Supervisor for Runit {
    fn kind(&self) -> Kind {
        Kind::Runit
    }

    fn own_pids(&self) -> anyhow::Result<Vec<i32>> {
        self.tree.own_pids()
    }

    fn supervised(&self) -> anyhow::Result<Vec<i32>> {
        self.tree.supervised()
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        self.tree.stop()
    }
}
