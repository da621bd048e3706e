//! The packages on a clean Debian system: a minimal root made by debootstrap (the package
//! `debootstrap`, from the Debian mirror; cached in `target/sitecast-debian/`), in which the
//! packages are installed with dpkg, Central Command started the way its unit starts it,
//! upgraded with an operator's change to its configuration, and removed and purged.
//!
//! Needs root (chroot) and the mirror (`SITECAST_DEBIAN_MIRROR`, default deb.debian.org).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SUITE: &str = "bookworm";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned()
}

/// Where this test binary's sibling binaries are: `target/<profile>/`.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_owned()
}

/// Runs `command`, fails the test with its output unless it succeeds; returns stdout.
fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?}: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A tarball of a minimal Debian root with what the packages depend on, made once.
fn base_tarball() -> PathBuf {
    let cache = repo().join("target/sitecast-debian");
    let tarball = cache.join(format!("{SUITE}-minbase.tar"));
    if tarball.exists() {
        return tarball;
    }
    std::fs::create_dir_all(&cache).expect("cache dir");
    let building = tempfile::tempdir_in(&cache).expect("tempdir");
    let root = building.path().join("root");
    let mirror = std::env::var("SITECAST_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=adduser,ca-certificates", SUITE])
        .arg(&root)
        .arg(mirror));
    let partial = building.path().join("root.tar");
    run(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&partial).arg("."));
    std::fs::rename(&partial, &tarball).expect("rename");
    tarball
}

/// A throw-away Debian root.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        run(Command::new("tar").arg("-C").arg(dir.path()).arg("-xf").arg(base_tarball()));
        Self { dir }
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("chroot");
        command.arg(self.dir.path()).arg(program).env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    /// Copies `deb` into the root and installs it with dpkg.
    fn install(&self, deb: &Path) -> String {
        let name = deb.file_name().expect("name").to_str().expect("utf8");
        std::fs::copy(deb, self.path("tmp").join(name)).expect("copy deb");
        run(self.command("dpkg").args(["-i", &format!("/tmp/{name}")]))
    }

    fn read(&self, inside: &str) -> String {
        std::fs::read_to_string(self.path(inside)).unwrap_or_else(|e| panic!("{inside}: {e}"))
    }

    fn version(&self, package: &str) -> String {
        run(self.command("dpkg-query").args(["-W", "-f=${Version} ${db:Status-Status}", package]))
    }

    /// Whether `unit` is enabled: the link in `multi-user.target.wants` (absolute, so it
    /// points into the root only from inside it: not followed here).
    fn enabled(&self, unit: &str) -> bool {
        let link = self.path("etc/systemd/system/multi-user.target.wants").join(unit);
        std::fs::symlink_metadata(link).is_ok()
    }
}

/// Builds the packages from this build's binaries.
fn build_debs(out: &Path) -> Vec<PathBuf> {
    let built = run(Command::new(repo().join("packaging/build-debs"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out));
    built.lines().map(PathBuf::from).collect()
}

fn deb<'a>(debs: &'a [PathBuf], package: &str) -> &'a Path {
    debs.iter()
        .find(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")))
        })
        .unwrap_or_else(|| panic!("no {package} in {debs:?}"))
}

/// `deb` again as version `version` (an upgrade of the same contents).
fn with_version(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).expect("control");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&control, text).expect("control");
    let out = dir.join(format!("upgrade-{version}.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "-Znone", "-b"]).arg(&tree).arg(&out));
    out
}

/// Central Command started inside `root` the way its unit starts it: as user `sitecast`,
/// with the options of `/etc/sitecast/coordinator.env`, the unit's `ExecStart` line.
struct Started {
    child: Child,
}

impl Started {
    fn coordinator(root: &Root) -> Self {
        let unit = root.read("lib/systemd/system/sitecast-coordinator.service");
        let exec =
            unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart").to_owned();
        let child = Command::new("chroot")
            .arg("--userspec=sitecast:sitecast")
            .arg(root.dir.path())
            .args(["/bin/sh", "-c"])
            .arg(format!("set -a; . /etc/sitecast/coordinator.env; exec {exec}"))
            .env("HOME", "/nonexistent")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chroot");
        Self { child }
    }

    /// Waits for `/healthz` to answer 200 on `port`.
    fn wait_healthy(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("the coordinator exited: {status}");
            }
            if healthz(port) {
                return;
            }
            assert!(Instant::now() < deadline, "no /healthz on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it; returns what it printed.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let mut out = String::new();
        self.child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
        let _ = self.child.wait();
        out
    }
}

fn healthz(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let request = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.starts_with("HTTP/1.1 200")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port()
}

/// Not root: say so loudly (CI runs the tests as root).
fn root_or_loud_skip(test: &str) -> bool {
    if run(Command::new("id").arg("-u")).trim() == "0" {
        return true;
    }
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !! SKIPPED {test}: installing packages in a throw-away root needs root (chroot).\n\
         !! Run the tests as root to exercise it; CI does.\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    false
}

#[test]
fn the_packages_install_start_upgrade_and_remove_on_a_clean_debian() {
    if !root_or_loud_skip("the_packages_install_start_upgrade_and_remove_on_a_clean_debian") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let debs = build_debs(work.path());
    let root = Root::new();

    // Install: binaries, units enabled, configuration, user, state directory, man pages.
    root.install(deb(&debs, "sitecast-coordinator"));
    assert!(root.version("sitecast-coordinator").ends_with(" installed"));
    assert!(root.enabled("sitecast-coordinator.service"));
    let passwd = root.read("etc/passwd");
    assert!(passwd.lines().any(|l| l.starts_with("sitecast:")), "no system user: {passwd}");
    let env = std::fs::metadata(root.path("etc/sitecast/coordinator.env")).expect("env");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&env.permissions()) & 0o777, 0o640);
    let page = run(root.command("zcat").arg("/usr/share/man/man1/sitecast-coordinator-serve.1.gz"));
    assert!(page.contains("tls\\-certificate"), "the man page documents the flags: {page}");
    assert!(root.path("usr/share/bash-completion/completions/sitecast-coordinator").exists());

    // The operator's change to the configuration, then a start as the unit starts it.
    let port = free_port();
    let configured = root.read("etc/sitecast/coordinator.env").replace(
        "SITECAST_COORDINATOR_ARGS=\"--listen 127.0.0.1:8080\"",
        &format!("SITECAST_COORDINATOR_ARGS=\"--listen 127.0.0.1:{port}\""),
    );
    assert!(configured.contains(&port.to_string()), "the shipped file changed shape");
    std::fs::write(root.path("etc/sitecast/coordinator.env"), &configured).expect("configure");
    let mut started = Started::coordinator(&root);
    started.wait_healthy(port);
    let first_run = started.stop();
    assert!(first_run.contains("operator token"), "first start makes the tokens: {first_run}");
    assert!(root.path("var/lib/sitecast-coordinator/state.redb").exists());

    // Upgrade: the operator's configuration and the state are kept.
    let upgrade = with_version(deb(&debs, "sitecast-coordinator"), "0.1.0+upgrade1", work.path());
    root.install(&upgrade);
    assert_eq!(root.version("sitecast-coordinator"), "0.1.0+upgrade1 installed");
    assert_eq!(root.read("etc/sitecast/coordinator.env"), configured, "configuration kept");
    let mut started = Started::coordinator(&root);
    started.wait_healthy(port);
    let second_run = started.stop();
    assert!(!second_run.contains("operator token"), "the state survived: {second_run}");

    // Remove keeps configuration and state; purge removes the configuration only.
    run(root.command("dpkg").args(["-r", "sitecast-coordinator"]));
    assert!(!root.path("usr/bin/sitecast-coordinator").exists());
    assert_eq!(root.read("etc/sitecast/coordinator.env"), configured);
    run(root.command("dpkg").args(["-P", "sitecast-coordinator"]));
    assert!(!root.path("etc/sitecast/coordinator.env").exists());
    assert!(!root.enabled("sitecast-coordinator.service"));
    assert!(
        root.path("var/lib/sitecast-coordinator/state.redb").exists(),
        "a fleet's history stays"
    );

    // The appliance side and the operator tools.
    root.install(deb(&debs, "sitecast-agent"));
    assert!(root.enabled("sitecast-agent.service"));
    // The shipped configuration passes the agent's own strict reading.
    run(root.command("/usr/bin/sitecast-peer").args([
        "--config",
        "/etc/sitecast/agent.toml",
        "config",
        "check",
    ]));
    run(root.command("/usr/bin/sitecast-launcher").arg("--version"));
    assert!(root.path("usr/share/man/man1/sitecast-launcher.1.gz").exists());
    root.install(deb(&debs, "sitecast-manifest"));
    run(root.command("/usr/bin/sitecast-manifest").args(["keygen", "--out", "/tmp/release.key"]));
    assert!(root.path("tmp/release.key.pub").exists());
}
