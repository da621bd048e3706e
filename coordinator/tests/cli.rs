//! The `sitecast-coordinator` binary: `serve` as a real process, and the operator CLI.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_sitecast-coordinator");

struct Served {
    child: Child,
    url: String,
    lines: Vec<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data_dir: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env_remove("SITECAST_OPERATOR_TOKEN")
        .env_remove("SITECAST_ENROLLMENT_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the coordinator");
    let stdout = child.stdout.take().expect("stdout");
    // Owned from here on, so the process is killed and reaped whatever happens below.
    let mut served = Served { child, url: String::new(), lines: Vec::new() };
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).expect("read") > 0,
            "server exited early: {:?}",
            served.lines
        );
        served.lines.push(line.trim().to_owned());
        if let Some(rest) = line.strip_prefix("listening on ") {
            served.url = rest.split_whitespace().next().expect("url").to_owned();
            return served;
        }
    }
}

fn cli(served: &Served, token: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .args(["--url", &served.url, "--token", token])
        .output()
        .expect("run the CLI");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_operator_cli_drives_a_real_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let releases = Releases::new(dir.path());
    let root_path = dir.path().join("root.json");
    std::fs::write(&root_path, releases.root.to_bytes()).expect("root");
    let data = dir.path().join("data");
    let root_arg = root_path.to_str().expect("utf8");
    let served = serve(
        &data,
        &["--root", root_arg, "--operator-token", OPERATOR, "--enrollment-token", ENROLL],
    );
    assert!(
        !served.lines.iter().any(|l| l.contains("shown once")),
        "configured tokens are not printed"
    );

    let (image1, bytes1) = releases.image(1, 300_000);
    let manifest1 = dir.path().join("m1.json");
    std::fs::write(&manifest1, releases.manifest(1, &bytes1, None, None)).expect("write");
    let (ok, out, err) = cli(
        &served,
        OPERATOR,
        &[
            "release",
            "publish",
            "--manifest",
            manifest1.to_str().expect("p"),
            "--image",
            image1.to_str().expect("p"),
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let record: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(record["version"], 1);

    // A file on the server's own disk comes in as a hard link, not a copy.
    let (image2, bytes2) = releases.image(2, 300_000);
    let manifest2 = dir.path().join("m2.json");
    std::fs::write(&manifest2, releases.manifest(2, &bytes2, None, None)).expect("write");
    let (ok, out, err) = cli(
        &served,
        OPERATOR,
        &[
            "release",
            "publish",
            "--manifest",
            manifest2.to_str().expect("p"),
            "--server-path",
            image2.to_str().expect("p"),
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("published release 2"), "{out}");
    // Copied, not linked: rewriting the operator's file later changes nothing served.
    assert_eq!(std::fs::metadata(&image2).expect("stat").nlink(), 1, "imported as a copy");
    std::fs::write(&image2, vec![0u8; bytes2.len()]).expect("rewrite the operator's file");
    let served_image = std::process::Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {OPERATOR}")])
        .arg(format!("{}/api/releases/2/image", served.url))
        .output()
        .expect("curl");
    assert!(served_image.status.success());
    assert_eq!(served_image.stdout, bytes2, "the origin serves what verified at publish");

    let (ok, out, err) =
        cli(&served, OPERATOR, &["rollout", "create", "--version", "2", "--strategy", "canary"]);
    assert!(ok, "{err}");
    assert!(out.contains("rollout 1 of release 2: in_progress (canary), stage 1/2"), "{out}");
    let (ok, out, _) = cli(&served, OPERATOR, &["rollout", "pause", "1"]);
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, out, _) = cli(&served, OPERATOR, &["rollout", "status", "--json"]);
    assert!(ok);
    let list: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list[0]["state"], "paused");
    let (ok, out, _) = cli(&served, OPERATOR, &["release", "list"]);
    assert!(ok && out.lines().count() == 3 && out.starts_with("RELEASE NAME"), "{out}");
    let (ok, out, _) = cli(&served, OPERATOR, &["audit"]);
    assert!(ok && out.contains("release.publish") && out.contains("rollout.pause"), "{out}");
    let (ok, out, _) = cli(&served, OPERATOR, &["appliances", "list", "--json"]);
    assert!(ok && out.trim() == "[]", "{out}");

    // A SWUpdate artifact for release 2, and a device that speaks hawkBit DDI.
    let swu = dir.path().join("gateway-2.0.swu");
    std::fs::write(&swu, b"a .swu is signed with the operator's own SWUpdate key").expect("swu");
    let swu_arg = swu.to_str().expect("p");
    let (ok, out, err) =
        cli(&served, OPERATOR, &["release", "swu", "--version", "2", "--file", swu_arg]);
    assert!(ok, "{err}");
    assert!(out.contains("release 2: gateway-2.0.swu (53 bytes"), "{out}");
    // Alone, as a release of its own, under a name that needs encoding.
    let (ok, out, err) = cli(
        &served,
        OPERATOR,
        &[
            "release",
            "swu",
            "--version",
            "7",
            "--file",
            swu_arg,
            "--name",
            "gw 2026/12 ü",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let alone: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (alone["version_name"].as_str(), alone["size"].as_u64()),
        (Some("gw 2026/12 ü"), Some(0))
    );
    let (ok, out, err) = cli(
        &served,
        OPERATOR,
        &[
            "ddi-target",
            "add",
            "--controller-id",
            "gw-7",
            "--site",
            "store-3",
            "--group",
            "gateways",
        ],
    );
    assert!(ok, "{err}");
    let token = out.lines().find_map(|l| l.strip_prefix("target token (shown once): "));
    assert_eq!(token.map(str::len), Some(32), "{out}");
    let (ok, out, _) = cli(&served, OPERATOR, &["appliances", "list"]);
    let row = out.lines().find(|l| l.contains("gw-7")).unwrap_or("");
    assert!(ok && row.contains("hawkbit-ddi") && row.contains("store-3"), "{out}");
    let (_, out, _) = cli(&served, OPERATOR, &["appliances", "list", "--json"]);
    let list: Value = serde_json::from_str(&out).expect("json");
    let gw = list.as_array().expect("list").iter().find(|a| a["key"] == "ddi:gw-7").cloned();
    assert_eq!(gw.map(|a| a["group"].clone()), Some(Value::from("gateways")), "{out}");

    let (ok, _, err) = cli(&served, "wrong", &["rollout", "status"]);
    assert!(!ok && err.contains("403") && err.contains("wrong operator token"), "{err}");
}

#[test]
fn first_start_shows_generated_tokens_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let first = serve(&data, &[]);
    let token = first
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("operator token (shown once, keep it): "))
        .expect("the operator token is shown on the first start")
        .to_owned();
    assert!(first.lines.iter().any(|l| l.starts_with("enrollment token")), "{:?}", first.lines);
    let (ok, out, err) = cli(&first, &token, &["rollout", "status"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "no rollouts");
    drop(first);

    let second = serve(&data, &[]);
    assert!(!second.lines.iter().any(|l| l.contains("shown once")), "{:?}", second.lines);
    let (ok, _, err) = cli(&second, &token, &["rollout", "status"]);
    assert!(ok, "the first token still works: {err}");
}

/// `serve` over its own TLS, and the operator CLI trusting the fleet's CA only when told to.
#[test]
fn the_cli_reaches_a_server_over_tls_with_the_fleet_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = sitecast_tls::test_ca::TestCa::new("fleet CA");
    let ca_file = ca.write_root(&dir.path().join("ca.pem"));
    let files = ca.issue(dir.path(), "server", &["127.0.0.1"], false);
    let (certificate, key) =
        (files.certificate.to_str().expect("utf8"), files.key.to_str().expect("utf8"));

    // Unusable files stop the start and say which.
    let output = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("refused"))
        .args(["--tls-certificate", certificate, "--tls-key", certificate])
        .output()
        .expect("serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("server.pem"), "{stderr}");

    let served = serve(
        &dir.path().join("data"),
        &["--operator-token", "op", "--tls-certificate", certificate, "--tls-key", key],
    );
    assert!(served.url.starts_with("https://127.0.0.1:"), "{}", served.url);
    let ca_arg = ca_file.to_str().expect("utf8");
    let (ok, stdout, stderr) = cli(&served, "op", &["release", "list", "--ca-file", ca_arg]);
    assert!(ok, "{stdout}{stderr}");
    // The system's roots do not know the fleet's CA.
    let (ok, _, stderr) = cli(&served, "op", &["release", "list"]);
    assert!(!ok && stderr.contains("UnknownIssuer"), "{stderr}");
}
