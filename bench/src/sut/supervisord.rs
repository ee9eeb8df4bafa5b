//! supervisord: one `[program]` with `numprocs = N`, configured for its fastest
//! restart (autorestart, startsecs = 0, no log capture, error-level logging).

use super::{Kind, Supervisor, Tree, Workload};
use crate::sys::{SIGTERM, Scratch};
use std::process::Command;

/// A running supervisord.
pub struct Supervisord {
    tree: Tree,
    _dir: Scratch,
}

impl Supervisord {
    /// Writes the configuration and starts `supervisord -n`.
    pub fn start(w: &Workload) -> anyhow::Result<Supervisord> {
        let dir = Scratch::new("supervisord")?;
        let d = dir.path().display();
        let command: Vec<String> = w
            .argv
            .iter()
            .map(|a| format!("\"{}\"", a.replace('"', "\\\"")))
            .collect();
        let conf = format!(
            "[supervisord]\n\
             nodaemon=true\n\
             user=root\n\
             logfile={d}/supervisord.log\n\
             pidfile={d}/supervisord.pid\n\
             childlogdir={d}\n\
             loglevel=error\n\
             minfds={minfds}\n\
             \n\
             [program:svc]\n\
             command={cmd}\n\
             numprocs={n}\n\
             process_name=%(program_name)s_%(process_num)d\n\
             autostart=true\n\
             autorestart=true\n\
             startsecs=0\n\
             startretries=1000000\n\
             stopsignal=TERM\n\
             stopwaitsecs=5\n\
             stdout_logfile=NONE\n\
             stderr_logfile=NONE\n",
            minfds = 4 * w.count + 1024,
            cmd = command.join(" "),
            n = w.count,
        );
        let path = dir.join("supervisord.conf");
        std::fs::write(&path, conf)?;
        let mut cmd = Command::new("supervisord");
        cmd.arg("-n").arg("-c").arg(&path);
        let tree = Tree::spawn(cmd, w, &dir.join("supervisord.out"), &[], SIGTERM)?;
        Ok(Supervisord { tree, _dir: dir })
    }
}

impl Supervisor for Supervisord {
    fn kind(&self) -> Kind {
        Kind::Supervisord
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
