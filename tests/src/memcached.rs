//! A `memcached` process with raw text-protocol access.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::process::{POLL, START_DEADLINE, free_port, is_root, signal, spawn_error, temp_dir};

/// How long one memcached exchange may take.
const MEMCACHED_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A `memcached` process on a free loopback port (or a unix socket), killed on drop.
///
/// Runs `memcached -l 127.0.0.1 -p PORT -U 0 -m 64 -t 1` (or, on a socket,
/// `-s PATH -a 0777` instead of `-l`/`-p`: memcached then opens no TCP port)
/// plus the extra arguments (and `-u root` when the tests run as root).
pub struct Memcached {
    /// Behind a lock so that a shared reference can stop or restart it.
    child: Mutex<Option<Child>>,
    port: u16,
    /// The unix socket, instead of the port.
    socket: Option<PathBuf>,
    args: Vec<String>,
    dir: TempDir,
}

/// A connection to the test memcached, TCP or unix.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

impl Memcached {
    /// Start with the default arguments.
    pub fn start() -> Memcached {
        Memcached::start_with(&[])
    }

    /// Start with extra arguments (`-I 2m`, `-M`, ...).
    pub fn start_with(args: &[&str]) -> Memcached {
        let mut memcached = Memcached {
            child: Mutex::new(None),
            port: 0,
            socket: None,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            dir: temp_dir("memcached"),
        };
        // Another process may take the free port before memcached binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            memcached.port = free_port();
            match memcached.spawn() {
                Ok(()) => return memcached,
                Err(e) => last_error = format!("{e:#}"),
            }
        }
        panic!("memcached did not start: {last_error}");
    }

    /// Start on a unix socket in its own temp directory (`memcached.sock`),
    /// readable and writable by everyone (`-a 0777`): nginx's workers run as
    /// `nobody` when the tests run as root.
    pub fn start_unix(args: &[&str]) -> Memcached {
        let dir = temp_dir("memcached");
        let memcached = Memcached {
            child: Mutex::new(None),
            port: 0,
            socket: Some(dir.path().join("memcached.sock")),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            dir,
        };
        if let Err(e) = memcached.spawn() {
            panic!("memcached did not start: {e:#}");
        }
        memcached
    }

    fn spawn(&self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("memcached.log");
        let log = std::fs::File::create(&log_path).context("create memcached.log")?;
        let mut command = Command::new("memcached");
        match &self.socket {
            Some(path) => {
                // A stale socket file from a killed instance makes bind fail.
                let _ = std::fs::remove_file(path);
                command.arg("-s").arg(path).args(["-a", "0777"]);
            }
            None => {
                command.args(["-l", "127.0.0.1", "-p", &self.port.to_string()]);
            }
        }
        command
            .args(["-U", "0", "-m", "64", "-t", "1"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log);
        if is_root() {
            command.args(["-u", "root"]);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| spawn_error("memcached", e));
        *self.child() = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let exited = self.child().as_mut().map(Child::try_wait);
            if let Some(Ok(Some(status))) = exited {
                *self.child() = None;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "memcached exited with {status} on {}: {log}",
                    self.address()
                );
            }
            if self.is_responsive(Duration::from_millis(200)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "memcached on {} not ready after {START_DEADLINE:?}: {log}",
                    self.address()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kill(&self) {
        let child = self.child().take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:PORT` or `unix:PATH`, as written in `memcached.servers`.
    pub fn address(&self) -> String {
        match &self.socket {
            Some(path) => format!("unix:{}", path.display()),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// The port (0 on a unix socket).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    /// Kill the process; the port then refuses connections.
    pub fn stop(&self) {
        self.kill();
    }

    /// Stop (when running) and start again on the same port or socket, empty.
    pub fn restart(&self) {
        self.kill();
        if let Err(e) = self.spawn() {
            panic!("memcached did not restart on {}: {e:#}", self.address());
        }
    }

    /// SIGSTOP: connections are accepted by the kernel but never answered.
    pub fn pause(&self) {
        let pid = self.pid().expect("memcached is not running");
        assert!(signal(pid, "STOP"), "`kill -s STOP {pid}` failed");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        let pid = self.pid().expect("memcached is not running");
        assert!(signal(pid, "CONT"), "`kill -s CONT {pid}` failed");
    }

    /// Does `version` get an answer within `timeout` on a fresh connection?
    pub fn is_responsive(&self, timeout: Duration) -> bool {
        let exchange = || -> std::io::Result<bool> {
            let mut stream = match &self.socket {
                Some(path) => {
                    let stream = UnixStream::connect(path)?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    Conn::Unix(stream)
                }
                None => {
                    let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
                    let stream = TcpStream::connect_timeout(&addr, timeout)?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    Conn::Tcp(stream)
                }
            };
            stream.write_all(b"version\r\n")?;
            let mut line = Vec::new();
            BufReader::new(stream).read_until(b'\n', &mut line)?;
            Ok(line.starts_with(b"VERSION "))
        };
        exchange().unwrap_or(false)
    }

    fn connect(&self) -> anyhow::Result<BufReader<Conn>> {
        let context = || format!("connect to memcached at {}", self.address());
        let stream = match &self.socket {
            Some(path) => {
                let stream = UnixStream::connect(path).with_context(context)?;
                stream.set_read_timeout(Some(MEMCACHED_IO_TIMEOUT))?;
                stream.set_write_timeout(Some(MEMCACHED_IO_TIMEOUT))?;
                Conn::Unix(stream)
            }
            None => {
                let stream = TcpStream::connect(("127.0.0.1", self.port)).with_context(context)?;
                stream.set_read_timeout(Some(MEMCACHED_IO_TIMEOUT))?;
                stream.set_write_timeout(Some(MEMCACHED_IO_TIMEOUT))?;
                Conn::Tcp(stream)
            }
        };
        Ok(BufReader::new(stream))
    }

    /// Send one command and read lines until one equals `end` (or an error line).
    fn lines_until(&self, command: &[u8], end: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut conn = self.connect()?;
        conn.get_mut().write_all(command)?;
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            if conn.read_until(b'\n', &mut line)? == 0 {
                bail!("memcached closed the connection after {lines:?}");
            }
            let line = line.strip_suffix(b"\r\n").unwrap_or(&line).to_vec();
            if line == end {
                return Ok(lines);
            }
            if line == b"ERROR"
                || line.starts_with(b"CLIENT_ERROR")
                || line.starts_with(b"SERVER_ERROR")
            {
                bail!("memcached answered {}", String::from_utf8_lossy(&line));
            }
            lines.push(line);
        }
    }

    /// `stats`, raw: name → value.
    pub fn stats(&self) -> HashMap<String, String> {
        let lines = self
            .lines_until(b"stats\r\n", b"END")
            .expect("memcached stats");
        lines
            .iter()
            .filter_map(|line| {
                let line = String::from_utf8_lossy(line);
                let mut words = line.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("STAT"), Some(name), Some(value)) => {
                        Some((name.to_owned(), value.to_owned()))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// A classic text `get` on a fresh connection, exactly what nginx sends:
    /// `(flags, value)`, or `None` on a miss. `key` is the literal memcached key.
    pub fn get_raw(&self, key: &[u8]) -> Option<(u32, Vec<u8>)> {
        self.try_get_raw(key)
            .unwrap_or_else(|e| panic!("memcached get {}: {e:#}", String::from_utf8_lossy(key)))
    }

    fn try_get_raw(&self, key: &[u8]) -> anyhow::Result<Option<(u32, Vec<u8>)>> {
        let mut conn = self.connect()?;
        let mut command = b"get ".to_vec();
        command.extend_from_slice(key);
        command.extend_from_slice(b"\r\n");
        conn.get_mut().write_all(&command)?;
        let mut line = Vec::new();
        conn.read_until(b'\n', &mut line)?;
        if line == b"END\r\n" {
            return Ok(None);
        }
        let header = String::from_utf8_lossy(&line).into_owned();
        let words: Vec<&str> = header.trim_end().split(' ').collect();
        let (flags, len) = match words.as_slice() {
            ["VALUE", _key, flags, len, ..] => (flags.parse::<u32>()?, len.parse::<usize>()?),
            _ => bail!("unexpected answer {header:?}"),
        };
        let mut value = vec![0; len + 7];
        conn.read_exact(&mut value)?;
        if !value.ends_with(b"\r\nEND\r\n") {
            bail!("bad trailer after {len} bytes");
        }
        value.truncate(len);
        Ok(Some((flags, value)))
    }

    /// `set key flags 0 len` (no expiry); panics unless memcached says `STORED`.
    pub fn set_raw(&self, key: &[u8], flags: u32, value: &[u8]) {
        self.set_raw_ttl(key, flags, 0, value);
    }

    /// `set` with an exptime (seconds, 0 = never).
    pub fn set_raw_ttl(&self, key: &[u8], flags: u32, exptime: u32, value: &[u8]) {
        let mut command = b"set ".to_vec();
        command.extend_from_slice(key);
        command.extend_from_slice(format!(" {flags} {exptime} {}\r\n", value.len()).as_bytes());
        command.extend_from_slice(value);
        command.extend_from_slice(b"\r\n");
        let answer = self.one_line(&command);
        assert_eq!(
            answer,
            "STORED",
            "memcached set {}",
            String::from_utf8_lossy(key)
        );
    }

    /// `delete key`: whether something was deleted.
    pub fn delete_raw(&self, key: &[u8]) -> bool {
        let mut command = b"delete ".to_vec();
        command.extend_from_slice(key);
        command.extend_from_slice(b"\r\n");
        match self.one_line(&command).as_str() {
            "DELETED" => true,
            "NOT_FOUND" => false,
            other => panic!("memcached delete {}: {other}", String::from_utf8_lossy(key)),
        }
    }

    /// `flush_all`.
    pub fn flush_all(&self) {
        assert_eq!(self.one_line(b"flush_all\r\n"), "OK");
    }

    fn one_line(&self, command: &[u8]) -> String {
        let exchange = || -> anyhow::Result<String> {
            let mut conn = self.connect()?;
            conn.get_mut().write_all(command)?;
            let mut line = String::new();
            conn.read_line(&mut line)?;
            Ok(line.trim_end().to_owned())
        };
        exchange().unwrap_or_else(|e| panic!("memcached at {}: {e:#}", self.address()))
    }

    /// Every key memcached holds (`lru_crawler metadump hash`: the LRU walk of `all` skips items that move while it runs), decoded from
    /// the URL encoding metadump uses: the literal keys, as [`get_raw`](Self::get_raw) takes them.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            // A crawl still running from a previous call answers BUSY: retry.
            match self.lines_until(b"lru_crawler metadump hash\r\n", b"END") {
                Ok(lines) if !lines.iter().any(|l| l.starts_with(b"BUSY")) => {
                    return lines
                        .iter()
                        .filter_map(|line| {
                            let key = line.strip_prefix(b"key=")?;
                            let end = key.iter().position(|b| *b == b' ').unwrap_or(key.len());
                            Some(percent_decode(&key[..end]))
                        })
                        .collect();
                }
                Ok(_) => {}
                Err(e) if Instant::now() >= deadline => panic!("memcached metadump: {e:#}"),
                Err(_) => {}
            }
            assert!(Instant::now() < deadline, "memcached metadump stayed BUSY");
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.kill();
    }
}

impl fmt::Debug for Memcached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memcached")
            .field("address", &self.address())
            .field("pid", &self.pid())
            .finish()
    }
}

fn percent_decode(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' && i + 2 < text.len() {
            if let (Some(h), Some(l)) = (hex(text[i + 1]), hex(text[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"/caf%C3%A9"), b"/caf\xC3\xA9");
        assert_eq!(percent_decode(b"/100%25"), b"/100%");
        assert_eq!(percent_decode(b"/a%2"), b"/a%2");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
    }
}
