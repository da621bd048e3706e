//! The operator tool end to end, on real files, checked against `b3sum` and `sha256sum`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sitecast-manifest"))
        .args(args)
        .output()
        .expect("run sitecast-manifest")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8 stdout")
}

fn failed(output: Output) -> String {
    assert!(!output.status.success(), "unexpected success: {output:?}");
    String::from_utf8(output.stderr).expect("utf8 stderr")
}

/// First word of a `b3sum`/`sha256sum` line. These must be installed (`.ci/run` does it):
/// the point of the test is agreement with the real tools.
fn external_hash(program: &str, file: &Path) -> String {
    let output = Command::new(program).arg(file).output().unwrap_or_else(|e| {
        panic!("{program} is required for this test (apt install {program}): {e}")
    });
    assert!(output.status.success(), "{program} failed");
    let text = String::from_utf8(output.stdout).expect("utf8");
    text.split_whitespace().next().expect("a hash").to_owned()
}

/// A generated image of an odd size that crosses many 16 KiB groups and hashing buffers.
fn write_image(path: &Path, len: usize) {
    let mut file = fs::File::create(path).expect("create image");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        for byte in &mut block {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        let n = left.min(block.len());
        file.write_all(&block[..n]).expect("write image");
        left -= n;
    }
}

#[test]
fn sign_and_verify_round_trip_agrees_with_b3sum_and_sha256sum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name).display().to_string();
    let image = d("image.raw");
    let image_path = Path::new(&image);
    write_image(image_path, 5 * 1024 * 1024 + 12_345);

    let mut publics = Vec::new();
    for name in ["root.key", "release-a.key", "release-b.key"] {
        let stdout = ok(tool(&["keygen", "--out", &d(name)]));
        let secret_text = fs::read_to_string(d(name)).expect("key file");
        let secret_hex = secret_text.split_whitespace().nth(1).expect("hex");
        assert!(!stdout.contains(secret_hex), "keygen printed the secret");
        let mode = fs::metadata(d(name)).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} must be private");
        publics.push(stdout.trim().to_owned());
    }
    let again = failed(tool(&["keygen", "--out", &d("root.key")]));
    assert!(again.contains("--force"), "{again}");

    ok(tool(&[
        "root",
        "init",
        "--root-key",
        &d("root.key"),
        "--release-key",
        &d("release-a.key.pub"),
        "--release-key",
        &d("release-b.key.pub"),
        "--release-threshold",
        "2",
        "--out",
        &d("root.json"),
    ]));
    ok(tool(&[
        "sign",
        "--image",
        &image,
        "--version",
        "42",
        "--name",
        "2026.11.2",
        "--platform",
        "x86_64-appliance",
        "--notes",
        "first",
        "--key",
        &d("release-a.key"),
        "--key",
        &d("release-b.key"),
        "--root",
        &d("root.json"),
        "--out",
        &d("manifest.json"),
    ]));

    let root: Value = serde_json::from_slice(&fs::read(d("root.json")).expect("read root"))
        .expect("root is json");
    assert_eq!(root["signed"]["root"]["keys"][0].as_str(), Some(&*publics[0]));
    assert_eq!(root["signed"]["release"]["keys"][1].as_str(), Some(&*publics[2]));

    let inspected: Value =
        serde_json::from_str(&ok(tool(&["inspect", "--json", &d("manifest.json")])))
            .expect("inspect --json is json");
    let signed = &inspected["signed"];
    assert_eq!(signed["image"]["blake3"].as_str(), Some(&*external_hash("b3sum", image_path)));
    assert_eq!(signed["image"]["sha256"].as_str(), Some(&*external_hash("sha256sum", image_path)));
    assert_eq!(signed["image"]["size"].as_u64(), Some(5 * 1024 * 1024 + 12_345));
    assert_eq!(signed["version"].as_u64(), Some(42));
    assert_eq!(inspected["signed_by"].as_array().map(Vec::len), Some(2));
    assert!(ok(tool(&["inspect", &d("manifest.json")])).contains("2026.11.2"));

    let (root, manifest) = (d("root.json"), d("manifest.json"));
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--root", &root, "--manifest", &manifest];
        args.extend_from_slice(extra);
        tool(&args)
    };
    let stdout =
        ok(verify(&["--image", &image, "--platform", "x86_64-appliance", "--installed", "41"]));
    assert!(stdout.contains("release 42"), "{stdout}");

    let stderr = failed(verify(&["--platform", "x86_64-appliance", "--installed", "42"]));
    assert!(stderr.contains("not newer than the installed version 42"), "{stderr}");
    let stderr = failed(verify(&["--platform", "arm64-kiosk"]));
    assert!(stderr.contains("not for \"arm64-kiosk\""), "{stderr}");
    let stderr = failed(verify(&["--now", "2099-01-01T00:00:00Z"]));
    assert!(stderr.contains("expired"), "{stderr}");

    // One flipped bit in the image.
    let mut bytes = fs::read(image_path).expect("read image");
    bytes[3_000_000] ^= 0x10;
    fs::write(d("evil.raw"), &bytes).expect("write");
    let stderr = failed(verify(&["--image", &d("evil.raw")]));
    assert!(stderr.contains("image BLAKE3 is"), "{stderr}");

    // Below threshold: one release key alone cannot sign against this root.
    let stderr = failed(tool(&[
        "sign",
        "--image",
        &image,
        "--version",
        "43",
        "--platform",
        "x86_64-appliance",
        "--key",
        &d("release-a.key"),
        "--root",
        &d("root.json"),
        "--out",
        &d("m2.json"),
    ]));
    assert!(stderr.contains("1 valid release signature(s), 2 required"), "{stderr}");
    assert!(!Path::new(&d("m2.json")).exists());
}

#[test]
fn root_rotation_via_the_tool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name).display().to_string();
    for name in ["old.key", "new.key", "release.key"] {
        ok(tool(&["keygen", "--out", &d(name)]));
    }
    ok(tool(&[
        "root",
        "init",
        "--root-key",
        &d("old.key"),
        "--release-key",
        &d("release.key.pub"),
        "--out",
        &d("root1.json"),
    ]));
    let stderr = failed(tool(&[
        "root",
        "rotate",
        "--current",
        &d("root1.json"),
        "--old-key",
        &d("new.key"),
        "--root-key",
        &d("new.key"),
        "--release-key",
        &d("release.key.pub"),
        "--out",
        &d("root2.json"),
    ]));
    assert!(stderr.contains("not signed by enough"), "{stderr}");
    ok(tool(&[
        "root",
        "rotate",
        "--current",
        &d("root1.json"),
        "--old-key",
        &d("old.key"),
        "--root-key",
        &d("new.key"),
        "--release-key",
        &d("release.key.pub"),
        "--out",
        &d("root2.json"),
    ]));
    let root2: Value =
        serde_json::from_slice(&fs::read(d("root2.json")).expect("read")).expect("json");
    assert_eq!(root2["signed"]["version"].as_u64(), Some(2));
    assert_eq!(root2["signatures"].as_array().map(Vec::len), Some(2));
}

/// `sign-agent` from build directories, `verify` of the result for an appliance and against
/// the files, and the refusals an operator meets.
#[test]
fn agent_releases_are_signed_from_build_directories_and_verified_against_their_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |name: &str| dir.path().join(name).display().to_string();
    ok(tool(&["keygen", "--out", &d("root.key")]));
    ok(tool(&["keygen", "--out", &d("release.key")]));
    let root = d("root.json");
    ok(tool(&[
        "root",
        "init",
        "--root-key",
        &d("root.key"),
        "--release-key",
        &d("release.key.pub"),
        "--out",
        &root,
    ]));

    let build = dir.path().join("build-x86");
    fs::create_dir_all(build.join("bin")).expect("dirs");
    fs::create_dir_all(build.join("share")).expect("dirs");
    write_image(&build.join("bin/sitecast-peer"), 300_000);
    fs::set_permissions(build.join("bin/sitecast-peer"), fs::Permissions::from_mode(0o755))
        .expect("chmod");
    fs::write(build.join("share/notes.txt"), "agent notes").expect("write");
    let platform = format!("x86_64-appliance={}", build.display());
    let manifest = d("agent-5.json");
    let release_key = d("release.key");
    let sign = |extra: &[&str]| {
        let mut args = vec!["sign-agent", "--build", &platform, "--version", "5", "--os-min", "3"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--key", &release_key, "--root", &root, "--out", &manifest]);
        tool(&args)
    };
    let out = ok(sign(&[]));
    assert!(out.contains("signed agent release 5 (1 platform(s), 2 files)"), "{out}");

    let document: Value =
        serde_json::from_slice(&fs::read(&manifest).expect("read")).expect("json");
    let files = &document["signed"]["builds"][0]["files"];
    assert_eq!(files[0]["path"], "bin/sitecast-peer");
    assert_eq!(files[0]["executable"], true);
    assert_eq!(files[1]["executable"], false);
    assert_eq!(
        files[0]["blake3"].as_str(),
        Some(external_hash("b3sum", &build.join("bin/sitecast-peer")).as_str())
    );

    let build_dir = build.display().to_string();
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--root", &root, "--manifest", &manifest];
        args.extend_from_slice(extra);
        tool(&args)
    };
    let out = ok(verify(&[
        "--platform",
        "x86_64-appliance",
        "--os-release",
        "4",
        "--installed",
        "4",
        "--dir",
        &build_dir,
    ]));
    assert!(out.contains("OK: agent release 5"), "{out}");
    let err = failed(verify(&["--platform", "x86_64-appliance", "--os-release", "2"]));
    assert!(err.contains("not on 2"), "{err}");
    let err = failed(verify(&["--platform", "arm64-box"]));
    assert!(err.contains("arm64-box"), "{err}");

    // A file changed after signing is caught, naming it.
    fs::write(build.join("share/notes.txt"), "agent notes, edited").expect("write");
    let err = failed(verify(&[
        "--platform",
        "x86_64-appliance",
        "--os-release",
        "4",
        "--dir",
        &build_dir,
    ]));
    assert!(err.contains("share/notes.txt"), "{err}");

    // An entry that is not an executable of the build is refused before anything is written.
    fs::remove_file(&manifest).expect("rm");
    let err = failed(sign(&["--entry", "share/notes.txt"]));
    assert!(err.contains("builds.entry"), "{err}");
    assert!(!Path::new(&manifest).exists());
}

#[test]
fn delta_shows_what_an_update_from_an_older_image_fetches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let noise = |len: usize, mut state: u64| -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let old = noise(3 * 1024 * 1024, 0x9e37_79b9_7f4a_7c15);
    // 20 kB of new data in the middle; the rest moves along.
    let middle = old.len() / 2;
    let new = [&old[..middle], &noise(20_000, 7), &old[middle..]].concat();
    let (old_path, new_path) = (dir.path().join("old.img"), dir.path().join("new.img"));
    fs::write(&old_path, &old).expect("write");
    fs::write(&new_path, &new).expect("write");
    let (from, to) = (old_path.to_str().expect("utf8"), new_path.to_str().expect("utf8"));

    let report: Value =
        serde_json::from_str(&ok(tool(&["delta", "--from", from, "--to", to, "--json"])))
            .expect("json");
    assert_eq!(report["image_bytes"], new.len() as u64);
    let missing = report["missing_bytes"].as_u64().expect("missing");
    // The new bytes are fetched, with the chunks they cut differently around them, and
    // nothing else.
    assert!((20_000..20_000 + 3 * 16 * 1024).contains(&missing), "{report}");
    let reused = report["reused_bytes"].as_u64().expect("reused");
    assert_eq!(reused + missing, new.len() as u64, "{report}");

    let text = ok(tool(&["delta", "--from", from, "--to", to]));
    assert!(text.contains("reused from the older image"), "{text}");
    assert!(text.contains("to fetch, as whole 16 KiB groups"), "{text}");
    let error = failed(tool(&["delta", "--from", from, "--to", "/nonexistent.img"]));
    assert!(error.contains("opening /nonexistent.img"), "{error}");
}
