//! A minimal NATS client over `std::net::TcpStream`, enough for a benchmark: the
//! text protocol's INFO, CONNECT, SUB, PUB, MSG, PING and PONG.

use anyhow::{Context, bail, ensure};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One connection to a NATS server.
pub struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    line: String,
}

/// The CONNECT options: no `+OK` per message, and no echo of our own messages.
const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"ham-bench\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1}\r\n";

impl Conn {
    /// Connects, reads the server's INFO, sends CONNECT and waits for its PONG.
    pub fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("cannot connect to nats-server at {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Conn {
            r: BufReader::with_capacity(1 << 16, s.try_clone()?),
            w: BufWriter::with_capacity(1 << 16, s),
            line: String::new(),
        };
        c.read_line()?;
        ensure!(
            c.line.starts_with("INFO "),
            "nats-server at {addr} said {:?}, not INFO",
            c.line
        );
        c.w.write_all(CONNECT)?;
        c.flush()?;
        // From here on reads wait as long as it takes (a subscriber may idle for
        // minutes); a closed connection still ends them.
        c.w.get_ref().set_read_timeout(None)?;
        Ok(c)
    }

    /// Another handle on the socket (to shut it down from another thread).
    pub fn socket(&self) -> anyhow::Result<TcpStream> {
        Ok(self.w.get_ref().try_clone()?)
    }

    fn read_line(&mut self) -> anyhow::Result<()> {
        self.line.clear();
        let n = self.r.read_line(&mut self.line)?;
        ensure!(n > 0, "nats-server closed the connection");
        let end = self.line.trim_end_matches(['\r', '\n']).len();
        self.line.truncate(end);
        Ok(())
    }

    /// Subscribes to `subject` as subscription `sid` (buffered: see [`Conn::flush`]).
    pub fn subscribe(&mut self, subject: &str, sid: u32) -> anyhow::Result<()> {
        write!(self.w, "SUB {subject} {sid}\r\n")?;
        Ok(())
    }

    /// Publishes one message (buffered: see [`Conn::send`] and [`Conn::flush`]).
    pub fn publish(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        write!(self.w, "PUB {subject} {}\r\n", payload.len())?;
        self.w.write_all(payload)?;
        self.w.write_all(b"\r\n")?;
        Ok(())
    }

    /// Writes out what is buffered.
    pub fn send(&mut self) -> anyhow::Result<()> {
        self.w.flush()?;
        Ok(())
    }

    /// Writes out what is buffered, then PING and waits for the PONG: the server has
    /// then processed everything sent before. Messages arriving meanwhile are dropped.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.w.write_all(b"PING\r\n")?;
        self.w.flush()?;
        loop {
            match self.next()? {
                Some(Incoming::Pong) => return Ok(()),
                Some(Incoming::Msg(_)) | None => {}
            }
        }
    }

    /// The next message's payload; answers the server's PINGs on the way.
    pub fn next_msg(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(Incoming::Msg(p)) = self.next()? {
                return Ok(p);
            }
        }
    }

    /// One protocol line (and its payload); `None` for lines handled here.
    fn next(&mut self) -> anyhow::Result<Option<Incoming>> {
        self.read_line()?;
        let l = self.line.as_str();
        if l.starts_with("MSG ") {
            let n: usize = l
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("malformed {l:?}"))?;
            let mut p = vec![0; n + 2];
            self.r.read_exact(&mut p)?;
            p.truncate(n);
            return Ok(Some(Incoming::Msg(p)));
        }
        match l {
            "PING" => {
                self.w.write_all(b"PONG\r\n")?;
                self.w.flush()?;
                Ok(None)
            }
            "PONG" => Ok(Some(Incoming::Pong)),
            "+OK" => Ok(None),
            _ if l.starts_with("INFO ") => Ok(None),
            _ => bail!("nats-server: {l}"),
        }
    }
}

enum Incoming {
    Msg(Vec<u8>),
    Pong,
}
