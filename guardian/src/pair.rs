//! The HAM/Guardian pair's private channel: a `SOCK_SEQPACKET` Unix socket between
//! the two processes.
//!
//! The HAM listens on it; the Guardian it spawns connects, and the HAM hands over,
//! with `SCM_RIGHTS`, a duplicate of the control socket's listener (so the Guardian
//! holds it when it takes over and clients queue in its backlog instead of being
//! refused) and the pidfd of every process it watches, as it opens them (so the
//! Guardian re-watches them at takeover without reading `/proc`, and with no window
//! in which a PID could be reused). The same channel carries the one request the HAM
//! may make of its Guardian, stop; its end-of-file (or the HAM's pidfd) is how the
//! Guardian learns that the HAM is gone. End-of-file comes first: the kernel closes a
//! dying process's descriptors before it tears down the rest (with thousands of pidfds
//! and tens of MiB, the pidfd turns readable ~20 ms later). Acting on it is safe
//! because the store's `flock` is the arbiter: the Guardian proceeds only once the
//! HAM's store descriptor is closed too.
//!
//! The hello also carries the HAM's own watch set (its epoll of pidfds), which the
//! Guardian only holds: a dying process tears down an epoll set it alone holds, and with
//! thousands of pidfds that is ~10 ms of kernel work in the dead HAM, on a CPU the
//! takeover needs. Held here, the set outlives the HAM and the new HAM closes it once
//! the takeover is done.
//!
//! Messages, one per packet: `H` hello (HAM pid, generation; the listener and the HAM's
//! watch set attached),
//! `W` watch (entity, pid, start time per attached pidfd, up to [`MAX_FDS`]),
//! `U` unwatch (entity), `S` stop.

use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType, accept_with, bind,
    connect, listen, recvmsg, sendmsg, socket_with,
};
use rustix::process::{Pid, PidfdFlags, pidfd_open};
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable that makes `hamd` start as a Guardian: the pair socket.
pub const GUARDIAN_ENV: &str = "HAM_GUARDIAN_OF";

/// Most descriptors sent in one packet.
pub const MAX_FDS: usize = 64;

const WATCH_RECORD: usize = 16;

/// What the HAM tells a new Guardian when it connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The HAM's PID (the Guardian's parent).
    pub ham_pid: i32,
    /// The pair's generation: how many takeovers came before.
    pub generation: u64,
}

/// A watched process as handed to the Guardian: its identity and its pidfd.
#[derive(Debug)]
pub struct HandedProcess {
    /// The process ID.
    pub pid: i32,
    /// Its start time (clock ticks since boot), as the HAM verified it.
    pub start_time: u64,
    /// Its pidfd.
    pub pidfd: OwnedFd,
}

/// Where the pair socket of a control socket lives: beside it, hidden.
pub fn pair_socket_path(control: &Path) -> PathBuf {
    let name = control
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ham.sock".into());
    control.with_file_name(format!(".{name}.pair"))
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

fn send(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    sendmsg(
        fd,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receives one packet: its bytes (empty at end-of-file) and its descriptors.
fn receive(fd: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 1 + MAX_FDS * WATCH_RECORD + 16];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        fd,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    buf.truncate(got.bytes);
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    Ok((buf, fds))
}

/// The HAM's end: the listening pair socket.
pub struct PairListener {
    listener: OwnedFd,
    path: PathBuf,
}

impl PairListener {
    /// Binds the pair socket (mode 0600, replacing a stale one).
    pub fn bind(path: &Path) -> io::Result<PairListener> {
        let _ = std::fs::remove_file(path);
        let listener = seqpacket()?;
        bind(&listener, &SocketAddrUnix::new(path)?)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        listen(&listener, 4)?;
        Ok(PairListener {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (up to `timeout`) for the Guardian to connect, then sends it the hello,
    /// the control socket's listening descriptor and the HAM's watch set (for the
    /// Guardian to hold; see the module's documentation).
    pub fn accept_guardian(
        &self,
        timeout: Duration,
        hello: Hello,
        control_listener: BorrowedFd<'_>,
        watch_set: BorrowedFd<'_>,
    ) -> io::Result<HamEnd> {
        let mut fds = [PollFd::new(&self.listener, PollFlags::IN)];
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        if poll(&mut fds, Some(&ts))? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the Guardian did not connect in time",
            ));
        }
        let stream = accept_with(&self.listener, SocketFlags::CLOEXEC)?;
        // A Guardian that stops reading must not stall the HAM: sends time out, and
        // the HAM then replaces that Guardian.
        rustix::net::sockopt::set_socket_timeout(
            &stream,
            rustix::net::sockopt::Timeout::Send,
            Some(Duration::from_millis(200)),
        )?;
        let mut msg = [0u8; 13];
        msg[0] = b'H';
        msg[1..5].copy_from_slice(&hello.ham_pid.to_le_bytes());
        msg[5..13].copy_from_slice(&hello.generation.to_le_bytes());
        send(stream.as_fd(), &msg, &[control_listener, watch_set])?;
        Ok(HamEnd { stream })
    }
}

impl Drop for PairListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The HAM's end of an established pair connection.
pub struct HamEnd {
    stream: OwnedFd,
}

impl HamEnd {
    /// Another handle on the same connection (for a thread that sends beside the HAM's
    /// loop; the packets of each handle keep their order).
    pub fn try_clone(&self) -> io::Result<HamEnd> {
        Ok(HamEnd {
            stream: self.stream.try_clone()?,
        })
    }

    /// Hands watched processes' pidfds to the Guardian: `(entity, pid, start time, pidfd)`.
    pub fn send_watched(&self, procs: &[(u32, i32, u64, BorrowedFd<'_>)]) -> io::Result<()> {
        for chunk in procs.chunks(MAX_FDS) {
            let mut msg = Vec::with_capacity(1 + chunk.len() * WATCH_RECORD);
            msg.push(b'W');
            let mut fds = Vec::with_capacity(chunk.len());
            for (entity, pid, start, fd) in chunk {
                msg.extend_from_slice(&entity.to_le_bytes());
                msg.extend_from_slice(&pid.to_le_bytes());
                msg.extend_from_slice(&start.to_le_bytes());
                fds.push(*fd);
            }
            send(self.stream.as_fd(), &msg, &fds)?;
        }
        Ok(())
    }

    /// Tells the Guardian an entity's process is no longer watched.
    pub fn send_unwatched(&self, entity: u32) -> io::Result<()> {
        let mut msg = [0u8; 5];
        msg[0] = b'U';
        msg[1..].copy_from_slice(&entity.to_le_bytes());
        send(self.stream.as_fd(), &msg, &[])
    }

    /// Asks the Guardian to exit (the first half of stopping the pair).
    pub fn request_stop(&mut self) -> io::Result<()> {
        send(self.stream.as_fd(), b"S", &[])
    }
}

/// The Guardian's end: what it received from its HAM.
pub struct GuardianEnd {
    stream: OwnedFd,
    /// The HAM's identity and the pair's generation.
    pub hello: Hello,
    /// A duplicate of the control socket's listening descriptor.
    pub control_listener: OwnedFd,
    ham_pidfd: OwnedFd,
    handed: HashMap<u32, HandedProcess>,
    /// Every handed pidfd, registered as it arrives (the data is the entity), so that a
    /// takeover starts with its watch set complete.
    watch_set: OwnedFd,
    /// The HAM's own watch set, held so that the HAM's death does not tear it down
    /// (absent from a HAM of an earlier version, which sent only the listener).
    ham_watch_set: Option<OwnedFd>,
}

/// What a Guardian brings to its takeover.
pub struct TakeoverKit {
    /// A duplicate of the control socket's listening descriptor.
    pub control_listener: OwnedFd,
    /// The pidfds the HAM handed over, by entity.
    pub handed: HashMap<u32, HandedProcess>,
    /// The epoll set every handed pidfd is registered in (the data of each is its
    /// entity): the new HAM's watch set.
    pub watch_set: OwnedFd,
    /// The dead HAM's watch set, to be closed once the takeover is done (closing it
    /// unregisters every pidfd: kernel work that must not delay the takeover).
    pub dead_ham_watch_set: Option<OwnedFd>,
}

/// Why a Guardian stopped waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The HAM asked it to exit.
    Stop,
    /// The HAM is gone: take over.
    HamDied,
    /// Nothing happened within the timeout given to [`GuardianEnd::wait`].
    Idle,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl GuardianEnd {
    /// Connects to the HAM's pair socket and receives the hello and the listener.
    pub fn connect(path: &Path) -> io::Result<GuardianEnd> {
        let stream = seqpacket()?;
        connect(&stream, &SocketAddrUnix::new(path)?)?;
        let (msg, mut fds) = receive(stream.as_fd())?;
        if msg.len() != 13 || msg[0] != b'H' || !(1..=2).contains(&fds.len()) {
            return Err(bad("malformed hello from the HAM"));
        }
        let hello = Hello {
            ham_pid: i32::from_le_bytes(msg[1..5].try_into().expect("4 bytes")),
            generation: u64::from_le_bytes(msg[5..13].try_into().expect("8 bytes")),
        };
        let pid = Pid::from_raw(hello.ham_pid).ok_or_else(|| bad("bad HAM pid"))?;
        let ham_pidfd = pidfd_open(pid, PidfdFlags::empty())?;
        let ham_watch_set = (fds.len() == 2).then(|| fds.remove(1));
        Ok(GuardianEnd {
            stream,
            hello,
            control_listener: fds.remove(0),
            ham_pidfd,
            handed: HashMap::new(),
            watch_set: epoll::create(CreateFlags::CLOEXEC)?,
            ham_watch_set,
        })
    }

    /// Blocks, keeping the handed pidfds up to date, until the HAM asks it to stop or
    /// dies. Signals do not wake it: only the HAM can stop its Guardian. `died`, if
    /// given, is one more descriptor whose readability means the HAM is gone (the
    /// store's lock was granted to this Guardian). With a `timeout`, returns
    /// [`Wake::Idle`] when that much time passed with nothing to do.
    pub fn wait(
        &mut self,
        died: Option<BorrowedFd<'_>>,
        timeout: Option<std::time::Duration>,
    ) -> Wake {
        let timeout = timeout.map(|t| rustix::time::Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        loop {
            let mut fds = vec![
                PollFd::new(&self.stream, PollFlags::IN),
                PollFd::new(&self.ham_pidfd, PollFlags::IN),
            ];
            if let Some(d) = &died {
                fds.push(PollFd::new(d, PollFlags::IN));
            }
            match poll(&mut fds, timeout.as_ref()) {
                Ok(0) if timeout.is_some() => return Wake::Idle,
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(_) => return Wake::HamDied,
            }
            let channel = fds[0].revents();
            let ham = fds[1].revents() | fds.get(2).map_or(PollFlags::empty(), |f| f.revents());
            if !channel.is_empty() {
                match self.handle_packet() {
                    Ok(Some(wake)) => return wake,
                    Ok(None) => continue,
                    Err(_) => return Wake::HamDied,
                }
            }
            if !ham.is_empty() {
                // Take in what the HAM sent before it died, then take over.
                while self.pending() {
                    if !matches!(self.handle_packet(), Ok(None)) {
                        break;
                    }
                }
                return Wake::HamDied;
            }
        }
    }

    fn pending(&self) -> bool {
        let mut fds = [PollFd::new(&self.stream, PollFlags::IN)];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
    }

    /// Handles one packet; `Some` when it ends the wait.
    fn handle_packet(&mut self) -> io::Result<Option<Wake>> {
        let (msg, fds) = receive(self.stream.as_fd())?;
        match msg.first() {
            // End of file: the HAM's end closed, so the HAM is dying (the store's lock
            // tells when it is safe to go on).
            None => Ok(Some(Wake::HamDied)),
            Some(b'S') => Ok(Some(Wake::Stop)),
            Some(b'U') if msg.len() == 5 => {
                let entity = u32::from_le_bytes(msg[1..5].try_into().expect("4 bytes"));
                if let Some(h) = self.handed.remove(&entity) {
                    let _ = epoll::delete(&self.watch_set, &h.pidfd);
                }
                Ok(None)
            }
            Some(b'W') if (msg.len() - 1) == fds.len() * WATCH_RECORD => {
                for (rec, pidfd) in msg[1..].chunks(WATCH_RECORD).zip(fds) {
                    let entity = u32::from_le_bytes(rec[0..4].try_into().expect("4 bytes"));
                    if let Some(old) = self.handed.remove(&entity) {
                        let _ = epoll::delete(&self.watch_set, &old.pidfd);
                    }
                    epoll::add(
                        &self.watch_set,
                        &pidfd,
                        EventData::new_u64(u64::from(entity)),
                        EventFlags::IN,
                    )?;
                    self.handed.insert(
                        entity,
                        HandedProcess {
                            pid: i32::from_le_bytes(rec[4..8].try_into().expect("4 bytes")),
                            start_time: u64::from_le_bytes(rec[8..16].try_into().expect("8")),
                            pidfd,
                        },
                    );
                }
                Ok(None)
            }
            Some(_) => Err(bad("malformed packet from the HAM")),
        }
    }

    /// The epoll set the handed pidfds are registered in, for registering it with an
    /// event loop before pidfds arrive (registering a full set costs milliseconds).
    pub fn watch_set(&self) -> BorrowedFd<'_> {
        self.watch_set.as_fd()
    }

    /// What a takeover needs: the control socket's listener, the pidfds the HAM
    /// handed over (by entity), the epoll set they are all registered in, and the dead
    /// HAM's own set to close afterwards.
    pub fn into_takeover(self) -> TakeoverKit {
        TakeoverKit {
            control_listener: self.control_listener,
            handed: self.handed,
            watch_set: self.watch_set,
            dead_ham_watch_set: self.ham_watch_set,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ham-pair-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn a_guardian_receives_the_listener_the_pidfds_and_a_stop_request() {
        let d = dir("stop");
        let control = UnixListener::bind(d.join("ctl.sock")).expect("control");
        let pair = PairListener::bind(&pair_socket_path(&d.join("ctl.sock"))).expect("pair");
        let path = pair.path().to_path_buf();
        let me = std::process::id() as i32;
        let guardian = std::thread::spawn(move || {
            let mut end = GuardianEnd::connect(&path).expect("connects");
            // The received descriptor is the same listening socket.
            let l = UnixListener::from(end.control_listener.try_clone().expect("dup"));
            let addr = l.local_addr().expect("addr");
            let wake = end.wait(None, None);
            let hello = end.hello;
            let kit = end.into_takeover();
            // The HAM's own watch set, held: the same open epoll, not a copy.
            let held = kit
                .dead_ham_watch_set
                .map(|fd| rustix::fs::fstat(&fd).expect("fstat").st_ino);
            (
                hello,
                addr.as_pathname().map(Path::to_path_buf),
                wake,
                kit.handed,
                held,
            )
        });
        let ham_set = epoll::create(CreateFlags::CLOEXEC).expect("epoll");
        let mut ham = pair
            .accept_guardian(
                Duration::from_secs(5),
                Hello {
                    ham_pid: me,
                    generation: 3,
                },
                control.as_fd(),
                ham_set.as_fd(),
            )
            .expect("accepts");
        // 100 watched processes (here: pidfds of this process), then one unwatched.
        let pid = Pid::from_raw(me).expect("pid");
        let pidfds: Vec<OwnedFd> = (0..100)
            .map(|_| pidfd_open(pid, PidfdFlags::empty()).expect("pidfd"))
            .collect();
        let procs: Vec<(u32, i32, u64, BorrowedFd<'_>)> = pidfds
            .iter()
            .enumerate()
            .map(|(i, fd)| (i as u32 + 1, me, 1000 + i as u64, fd.as_fd()))
            .collect();
        ham.send_watched(&procs).expect("sends pidfds");
        ham.send_unwatched(7).expect("unwatch");
        ham.request_stop().expect("stop");
        let (hello, addr, wake, handed, held) = guardian.join().expect("joins");
        assert_eq!(
            held,
            Some(rustix::fs::fstat(&ham_set).expect("fstat").st_ino)
        );
        assert_eq!(
            hello,
            Hello {
                ham_pid: me,
                generation: 3
            }
        );
        assert_eq!(addr, Some(d.join("ctl.sock")));
        assert_eq!(wake, Wake::Stop);
        assert_eq!(handed.len(), 99);
        assert!(!handed.contains_key(&7));
        assert_eq!(handed[&100].start_time, 1099);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_closed_channel_without_stop_means_the_ham_is_gone() {
        let d = dir("gone");
        let control = UnixListener::bind(d.join("ctl.sock")).expect("control");
        let pair = PairListener::bind(&d.join("p.pair")).expect("pair");
        // A short-lived "HAM": a child process whose pid the hello names.
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .expect("child");
        let path = pair.path().to_path_buf();
        let child_pid = child.id() as i32;
        let guardian = std::thread::spawn(move || {
            GuardianEnd::connect(&path)
                .expect("connects")
                .wait(None, None)
        });
        let ham = pair
            .accept_guardian(
                Duration::from_secs(5),
                Hello {
                    ham_pid: child_pid,
                    generation: 0,
                },
                control.as_fd(),
                epoll::create(CreateFlags::CLOEXEC).expect("epoll").as_fd(),
            )
            .expect("accepts");
        drop(ham);
        let _ = child.wait();
        assert_eq!(guardian.join().expect("joins"), Wake::HamDied);
        let _ = std::fs::remove_dir_all(&d);
    }
}
