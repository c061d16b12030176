//! nginx running the rendered config from its own temp directory.

use std::fmt;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{POLL, START_DEADLINE, reap, signal, spawn_error, temp_dir};

/// nginx running `render_nginx_full(config)` from its own temp directory,
/// stopped (SIGTERM, then SIGKILL) and cleaned up on drop.
pub struct Nginx {
    child: Option<Child>,
    dir: TempDir,
    address: String,
}

impl Nginx {
    /// Render, start and wait until `config.nginx.listen` accepts connections.
    /// Panics with error.log when nginx does not come up. Point
    /// `config.nginx.listen`/`app` at [`free_addr`](crate::free_addr)s first.
    pub fn start(config: &mcpage::Config) -> Nginx {
        Nginx::start_with(&config.nginx.listen, |dir| {
            mcpage::nginx::render_nginx_full(config, dir)
        })
    }

    /// nginx from a config the test writes itself: `text` gets the prefix
    /// directory (for logs, pid and temp paths) and returns nginx.conf.
    /// Waits until `listen` accepts connections, like [`start`](Self::start).
    pub fn start_with(listen: &str, text: impl FnOnce(&Path) -> String) -> Nginx {
        let dir = temp_dir("nginx");
        let conf = dir.path().join("nginx.conf");
        let text = text(dir.path());
        std::fs::write(&conf, &text).unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        let output =
            std::fs::File::create(dir.path().join("stderr.log")).expect("create stderr.log");
        let mut prefix = dir.path().as_os_str().to_owned();
        prefix.push("/");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("dup stderr.log"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| spawn_error("nginx", e));
        let mut nginx = Nginx {
            child: Some(child),
            dir,
            address: connect_address(listen),
        };
        nginx.wait_ready(&text);
        nginx
    }

    fn wait_ready(&mut self, config_text: &str) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "nginx exited ({status}) before listening on {}\n--- error.log:\n{}\n--- stderr:\n{}\n--- nginx.conf:\n{config_text}",
                    self.address,
                    self.error_log(),
                    self.read("stderr.log"),
                );
            }
            if TcpStream::connect(&self.address).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nginx not listening on {} after {START_DEADLINE:?}\n--- error.log:\n{}\n--- stderr:\n{}",
                    self.address,
                    self.error_log(),
                    self.read("stderr.log"),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `host:port` nginx listens on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// `http://host:port` + `path` (`path` starts with `/`; sent unchanged).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// The prefix directory (nginx.conf, logs, temp paths).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The rendered nginx.conf this instance runs.
    pub fn config_text(&self) -> String {
        self.read("nginx.conf")
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        self.read("error.log")
    }

    /// The access log so far (format `mcpage`); lines appear when a response
    /// is finished, so poll with [`wait_until`](crate::wait_until).
    pub fn access_log(&self) -> String {
        self.read("access.log")
    }

    fn read(&self, name: &str) -> String {
        std::fs::read(self.dir.path().join(name))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
            if matches!(child.try_wait(), Ok(None)) {
                let _ = signal(child.id(), "TERM");
            }
            reap(&mut child, Duration::from_secs(10));
        }
    }
}

impl fmt::Debug for Nginx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nginx")
            .field("address", &self.address)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Where to connect for an nginx `listen` value (`8080`, `127.0.0.1:8080`, `[::1]:8080 reuseport`).
fn connect_address(listen: &str) -> String {
    let addr = listen.split_whitespace().next().unwrap_or(listen);
    if addr.contains(':') {
        addr.replace("*:", "127.0.0.1:")
            .replace("0.0.0.0:", "127.0.0.1:")
    } else {
        format!("127.0.0.1:{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_to_connect_address() {
        assert_eq!(connect_address("8080"), "127.0.0.1:8080");
        assert_eq!(connect_address("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(connect_address("[::1]:8080 reuseport"), "[::1]:8080");
    }
}
