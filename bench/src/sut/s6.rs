//! s6: `s6-svscan` on a scan directory of N service directories, one `s6-supervise`
//! each. With readiness, each service has `notification-fd` = 3 and the child writes
//! its readiness line there, which lifts s6-supervise's 1 s restart pacing for a
//! service that has been ready for more than a second.

use super::{Kind, Supervisor, Tree, Workload, write_run};
use crate::sys::{SIGTERM, Scratch};
use std::process::Command;

/// A running s6 supervision tree.
pub struct S6 {
    tree: Tree,
    _dir: Scratch,
}

impl S6 {
    /// Writes the service directories and starts `s6-svscan`.
    pub fn start(w: &Workload) -> anyhow::Result<S6> {
        let dir = Scratch::new("s6")?;
        let scan = dir.subdir("scan")?;
        for i in 0..w.count {
            let svc = scan.join(format!("svc{i}"));
            std::fs::create_dir_all(&svc)?;
            write_run(&svc, &w.argv)?;
            if w.readiness {
                std::fs::write(svc.join("notification-fd"), "3\n")?;
            }
        }
        let mut w = w.clone();
        if w.readiness {
            w.env.push(("HAM_BENCH_NOTIFY_FD".into(), "3".into()));
        }
        let mut cmd = Command::new("s6-svscan");
        // -c: how many services it maintains (default 500).
        cmd.arg("-c")
            .arg((w.count + 16).max(500).to_string())
            .arg(&scan);
        let tree = Tree::spawn(
            cmd,
            &w,
            &dir.join("s6-svscan.log"),
            &["s6-supervise"],
            SIGTERM,
        )?;
        Ok(S6 { tree, _dir: dir })
    }
}

impl Supervisor for S6 {
    fn kind(&self) -> Kind {
        Kind::S6
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
