//! A PostgreSQL server of the test's own (Debian's `postgresql`): a cluster made by `initdb`
//! in a temporary directory, listening on a Unix socket there only, stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// The directory of Debian's PostgreSQL programs (`/usr/lib/postgresql/<major>/bin`).
fn postgres_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (Debian package postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `program`, as the `postgres` user when this is root (PostgreSQL refuses to run as root).
fn command(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(program: &Path, args: &[&str]) {
    let output = command(program).args(args).output().expect("run a PostgreSQL program");
    assert!(
        output.status.success(),
        "{} {args:?}: {}\n{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TestPostgres {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("pg").tempdir_in("/tmp").expect("tempdir");
        if is_root() {
            let status = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "chown postgres");
        }
        let bin = postgres_bin();
        let server = Self { dir, bin };
        let data = server.data();
        let initdb = ["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"];
        run(&server.bin.join("initdb"), &initdb);
        server.resume();
        server
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    /// Starts the server (again, after [`Self::stop`]).
    pub fn resume(&self) {
        let socket = self.dir.path().display();
        let options = format!("-c listen_addresses='' -k {socket} -c fsync=off");
        let log = format!("{socket}/server.log");
        let data = self.data();
        run(&self.bin.join("pg_ctl"), &["-D", &data, "-o", &options, "-l", &log, "-w", "start"]);
    }

    /// Stops the server at once, as a crash would (connections are cut).
    pub fn stop(&self) {
        run(&self.bin.join("pg_ctl"), &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    /// A connection string for its `postgres` database.
    pub fn url(&self) -> String {
        format!("host={} user=postgres dbname=postgres", self.dir.path().display())
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // Not `run`: stopping a stopped server fails, and must not panic while unwinding.
        let stop = ["-D", &self.data(), "-m", "immediate", "stop"];
        let _ = command(&self.bin.join("pg_ctl")).args(stop).output();
    }
}
