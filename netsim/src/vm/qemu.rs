//! One virtual appliance: QEMU (software emulation) started through `appliance/run-vm` on its
//! own disk file, its serial console kept in a log the harness reads as the appliance's story.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How a VM is wired: its own QEMU user network (the host, hence Central Command, at `.2` of
/// it) and, for a site of several, the site LAN through the harness's hub.
#[derive(Debug, Clone)]
pub struct VmNet {
    /// e.g. `10.0.11.0/24`.
    pub user_net: String,
    /// The hub's TCP port on 127.0.0.1 (QEMU socket networking), if the VM is on a site LAN.
    pub lan_hub_port: Option<u16>,
    /// The MACs of the user-network NIC and the LAN NIC: distinct per VM (QEMU's default is
    /// the same for all, and appliances enroll with their MACs).
    pub mac: String,
    pub lan_mac: String,
}

#[derive(Debug)]
pub struct Vm {
    pub name: String,
    pub disk: PathBuf,
    /// The serial console of every boot, appended.
    pub console: PathBuf,
    run_vm: PathBuf,
    net: VmNet,
    qemu: Option<Child>,
    /// Console bytes before the current boot started: what [`Vm::this_boot`] skips.
    boot_offset: usize,
    pub started: Instant,
}

impl Vm {
    pub fn start(
        name: &str,
        run_vm: &Path,
        disk: &Path,
        console: &Path,
        net: VmNet,
    ) -> Result<Self> {
        let mut vm = Vm {
            name: name.to_owned(),
            disk: disk.to_owned(),
            console: console.to_owned(),
            run_vm: run_vm.to_owned(),
            net,
            qemu: None,
            boot_offset: 0,
            started: Instant::now(),
        };
        vm.power_on()?;
        Ok(vm)
    }

    /// Starts QEMU on the disk as it is (after [`Vm::power_cut`], that is a cold boot).
    pub fn power_on(&mut self) -> Result<()> {
        if self.qemu.is_some() {
            bail!("{} is already running", self.name);
        }
        self.boot_offset = std::fs::metadata(&self.console).map_or(0, |m| m.len() as usize);
        let mut command = Command::new(&self.run_vm);
        command
            .arg("--log")
            .arg(&self.console)
            .args(["--user-net", &self.net.user_net])
            .args(["--mac", &self.net.mac])
            .arg(&self.disk)
            .arg("--");
        if let Some(port) = self.net.lan_hub_port {
            command.args([
                "-netdev".to_owned(),
                format!("socket,id=lan,connect=127.0.0.1:{port}"),
                "-device".to_owned(),
                format!("virtio-net-pci,netdev=lan,mac={}", self.net.lan_mac),
            ]);
        }
        // The console goes to the log; QEMU's own stdout (the same text) is not needed.
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", self.run_vm.display()))?;
        self.qemu = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// Pulls the plug: QEMU is killed, so the guest gets no chance to flush or unmount. What
    /// its disk holds is what it had written to the virtual disk.
    pub fn power_cut(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
    }

    /// Everything the console showed, every boot, as plain text.
    pub fn console_text(&self) -> String {
        plain(&std::fs::read(&self.console).unwrap_or_default())
    }

    /// The console since the last [`Vm::power_on`].
    pub fn this_boot(&self) -> String {
        let text = std::fs::read(&self.console).unwrap_or_default();
        plain(text.get(self.boot_offset..).unwrap_or_default())
    }

    /// Polls the console until `done` holds for what it showed since the last power-on.
    /// Fails when QEMU exits or when `patience` runs out (a hang, not a measurement), naming
    /// the console log.
    pub async fn wait_console(
        &mut self,
        what: &str,
        patience: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            if done(&self.this_boot()) {
                return Ok(());
            }
            if let Some(qemu) = self.qemu.as_mut()
                && let Some(status) = qemu.try_wait()?
            {
                self.qemu = None;
                bail!(
                    "{}: QEMU exited ({status}) waiting for {what}; console in {}",
                    self.name,
                    self.console.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no {what} after {patience:?}; console in {}",
                    self.name,
                    self.console.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.qemu.as_mut().is_some_and(|q| matches!(q.try_wait(), Ok(None)))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_cut();
    }
}

/// Console bytes as text without terminal colour codes (`ESC [ … m`: the agent colours its
/// log on a terminal, and the serial console is one).
fn plain(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the end of the escape sequence (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The slot the running system booted from and its release, from what `rcS` prints:
/// `kernel command line: … ab.partition=B …` and `sitecast appliance release 2, slot B`.
pub fn booted(console: &str) -> Option<(char, u64)> {
    let cmdline =
        console.lines().rev().find(|l| l.contains("sitecast-rcS: kernel command line:"))?;
    let slot = cmdline.split_whitespace().find_map(|w| w.strip_prefix("ab.partition="))?;
    let slot = slot.chars().next()?;
    let release_line =
        console.lines().rev().find(|l| l.contains("sitecast-rcS: sitecast appliance release "))?;
    let after = release_line.split("sitecast appliance release ").nth(1)?;
    let version = after.split(',').next()?.trim().parse().ok()?;
    Some((slot, version))
}

/// How many times the machine started (power-on or reboot): the firmware's banner. GRUB's own
/// lines are no count: with `-nographic` SeaBIOS mirrors GRUB's screen terminal onto the
/// serial port as well, redrawn with cursor moves that may cut words, so each appears once or
/// twice.
pub fn machine_starts(console: &str) -> usize {
    console.matches("SeaBIOS (").count()
}

/// How many boots from `slot` reached the root file system's start scripts (`rcS` prints the
/// kernel command line GRUB passed, `ab.partition=X` in it).
pub fn userspace_boots(console: &str, slot: char) -> usize {
    let partition = format!("ab.partition={slot}");
    console
        .lines()
        .filter(|l| l.contains("sitecast-rcS: kernel command line:") && l.contains(&partition))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_booted_slot_and_release_from_the_console() {
        let console = "sitecast: booting slot A\n\
            sitecast-rcS: kernel command line: BOOT_IMAGE=(hd0,gpt3)/vmlinuz ab.partition=A ro\n\
            sitecast-rcS: sitecast appliance release 1, slot A, up 5.1 s\n\
            sitecast: booting slot B\n\
            sitecast-rcS: kernel command line: BOOT_IMAGE=(hd0,gpt4)/vmlinuz ab.partition=B ro\n\
            sitecast-rcS: sitecast appliance release 2, slot B, up 6.5 s\n";
        assert_eq!(booted(console), Some(('B', 2)));
        assert_eq!(booted("sitecast: booting slot A\n"), None);
        assert_eq!(userspace_boots(console, 'A'), 1);
        assert_eq!(userspace_boots(console, 'B'), 1);
        assert_eq!(machine_starts("SeaBIOS (version 1.16)\nSeaBIOS (ve\x1b[1;1H"), 2);
    }

    #[test]
    fn colour_codes_are_dropped() {
        let raw = b"\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m download finished \x1b[3mpeak_rss_mib\x1b[0m\x1b[2m=\x1b[0m34";
        assert_eq!(plain(raw), "2026  INFO download finished peak_rss_mib=34");
    }
}
