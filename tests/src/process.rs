//! Processes and ports: free loopback ports, temp directories, signals,
//! spawning with an install hint, and reaping with a grace period.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// What to run when a binary is missing.
pub const INSTALL_HINT: &str = "install them with `apt-get install -y memcached nginx` \
     (Debian's `nginx` package includes the memcached and gunzip modules)";

/// How long a process may take to become ready.
pub(crate) const START_DEADLINE: Duration = Duration::from_secs(15);
/// The interval of every polling loop.
pub(crate) const POLL: Duration = Duration::from_millis(5);

/// A free TCP port on 127.0.0.1 (bound once, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind 127.0.0.1:0")
}

/// `127.0.0.1:<free port>`, for `config.nginx.listen` and `config.nginx.app`.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A fresh directory under the system temp dir (`mcpage-<kind>-XXXXXX`),
/// removed on drop. It is made `0755`: nginx workers started by root run as
/// `nobody` and must traverse it to reach the paths under it.
pub fn temp_dir(kind: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("mcpage-{kind}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("create a temp dir for {kind}: {e}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.path().display()));
    dir
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Send a signal by name to `pid` with the `kill` command (no unsafe code).
pub(crate) fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .arg("-s")
        .arg(name)
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub(crate) fn spawn_error(binary: &str, error: std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::NotFound {
        panic!("`{binary}` is not installed: {INSTALL_HINT}");
    }
    panic!("cannot start `{binary}`: {error}");
}

/// Wait for `child` to exit, killing it after `grace`.
pub(crate) fn reap(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(POLL),
        }
    }
}
