//! Devices that speak hawkBit DDI: Debian's `swupdate` in suricatta mode, a real process,
//! against a real Central Command on 127.0.0.1. The `.swu` is built here with openssl and
//! cpio and signed with a key made for the test, as an operator's own SWUpdate key would be.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use sitecast_coordinator::server::Clock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SITE: &str = "store-ddi";

/// A `.swu` whose one image the `raw` handler writes into `target`.
struct Swu {
    path: PathBuf,
    /// The signer's certificate: the device's `public-key-file`.
    cert: PathBuf,
    payload: Vec<u8>,
}

fn run(command: &mut Command) {
    let output = command.output().expect("run");
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn build_swu(dir: &Path, payload: Vec<u8>, target: &Path) -> Swu {
    let work = dir.join("swu-build");
    std::fs::create_dir_all(&work).expect("mkdir");
    let (key, cert) = (dir.join("swu.key"), dir.join("swu.crt"));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj"])
        .arg("/CN=sitecast test SWUpdate key")
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    std::fs::write(work.join("rootfs.img"), &payload).expect("payload");
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&payload))
    };
    let description = format!(
        r#"software =
{{
    version = "2.0";
    hardware-compatibility: [ "1.0" ];
    images: (
        {{
            filename = "rootfs.img";
            type = "raw";
            device = "{}";
            sha256 = "{sha256}";
        }}
    );
}}
"#,
        target.display()
    );
    std::fs::write(work.join("sw-description"), description).expect("sw-description");
    run(Command::new("openssl")
        .args(["cms", "-sign", "-in", "sw-description", "-out", "sw-description.sig", "-signer"])
        .arg(&cert)
        .arg("-inkey")
        .arg(&key)
        .args(["-outform", "DER", "-nosmimecap", "-binary"])
        .current_dir(&work));
    let path = dir.join("update.swu");
    let output = std::fs::File::create(&path).expect("swu");
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "crc", "--quiet"])
        .current_dir(&work)
        .stdin(Stdio::piped())
        .stdout(output)
        .spawn()
        .expect("cpio");
    {
        use std::io::Write;
        let mut stdin = cpio.stdin.take().expect("stdin");
        stdin.write_all(b"sw-description\nsw-description.sig\nrootfs.img\n").expect("names");
    }
    assert!(cpio.wait().expect("cpio").success());
    Swu { path, cert, payload }
}

/// `swupdate -u` for device `id`; `confirm` is the bootloader's verdict after a reboot
/// (`2` success, `3` failure), which a test stands in for.
struct Suricatta {
    child: Child,
    log: PathBuf,
}

impl Suricatta {
    /// Runs in `dir` (its configuration, sockets, log, and the `rebooted` file its post-update
    /// command makes); `cert` is the SWUpdate signer's certificate; `extra` more suricatta
    /// arguments.
    fn start(
        dir: &Path,
        cert: &Path,
        url: &str,
        id: &str,
        token: &str,
        confirm: Option<u8>,
        extra: &str,
    ) -> Self {
        let tmp = dir.join("swupdate-tmp");
        std::fs::create_dir_all(&tmp).expect("tmp");
        let config = dir.join("swupdate.cfg");
        let rebooted = dir.join("rebooted");
        std::fs::write(
            &config,
            format!(
                r#"globals : {{
    verbose = true;
    loglevel = 6;
    public-key-file = "{}";
    postupdatecmd = "touch {}";
}};
identify : (
    {{ name = "board"; value = "sitecast-test"; }}
);
"#,
                cert.display(),
                rebooted.display()
            ),
        )
        .expect("config");
        let mut args = format!(
            "-t DEFAULT -u {} -i {id} -k {token} -p 1 -r 3 -w 1 -s 30 {extra}",
            url.trim_start_matches("http://")
        );
        if let Some(confirm) = confirm {
            args.push_str(&format!(" -c {confirm} -m 1"));
        }
        let log = dir.join(format!("swupdate-{}.log", confirm.unwrap_or(0)));
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new("swupdate")
            .arg("-f")
            .arg(&config)
            .args(["-H", "board:1.0", "-v", "-u", &args])
            .env("TMPDIR", &tmp)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("swupdate (Debian package swupdate)");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Suricatta {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn device(server: &TestServer, id: &str) -> Value {
    let (status, list) = server.op_json(Method::GET, "/api/appliances", None).await;
    assert_eq!(status, 200);
    let key = format!("ddi:{id}");
    list.as_array().expect("list").iter().find(|a| a["key"] == key).cloned().unwrap_or(Value::Null)
}

async fn wait_device(
    server: &TestServer,
    id: &str,
    what: &str,
    client: &Suricatta,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let device = device(server, id).await;
        if done(&device) {
            return device;
        }
        assert!(Instant::now() < deadline, "never {what}: {device:#}\n{}", client.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Central Command with releases 1 and 2 (its image, and a `.swu` of it for DDI devices).
struct Lab {
    dir: tempfile::TempDir,
    server: TestServer,
    swu: Swu,
    /// The file the `.swu`'s raw handler writes: the device's standby slot.
    slot: PathBuf,
}

impl Lab {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let releases = Releases::new(dir.path());
        let server = TestServer::start_with(&dir.path().join("data"), &releases.root, |config| {
            config.fleet.checkin_interval_secs = 1;
            config.ddi_gateway_token = Some(GATEWAY.into());
        })
        .await;
        // Release 1 is what a rollback returns to (it has no `.swu`: DDI devices stay put).
        let (_, first) = releases.image(1, 64 << 10);
        let manifest = releases.manifest(1, &first, None, None);
        assert_eq!(server.publish(&manifest, first).await.status(), 201);
        let (_, image) = releases.image(2, 3 << 20);
        let manifest = releases.manifest(2, &image, None, None);
        assert_eq!(server.publish(&manifest, image.clone()).await.status(), 201);
        let slot = dir.path().join("standby-slot");
        std::fs::write(&slot, vec![0u8; image.len()]).expect("slot");
        let swu = build_swu(dir.path(), image, &slot);
        let response = server
            .op(Method::PUT, "/api/releases/2/swu/update.swu")
            .body(std::fs::read(&swu.path).expect("swu"))
            .send()
            .await
            .expect("upload");
        assert_eq!(response.status(), 201);
        Self { dir, server, swu, slot }
    }

    /// Opens the site's window around the test clock's time (10:00 UTC).
    async fn open_window(&self) {
        let now = self.server.clock.now();
        assert!(now.to_string().contains("T10:"), "{now}");
        let window = json!({"start": "09:00", "end": "12:00", "timezone": "UTC",
            "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]});
        let path = format!("/api/sites/{SITE}/window");
        let (status, body) = self.server.op_json(Method::PUT, &path, Some(window)).await;
        assert_eq!(status, 204, "{body}");
    }

    /// Registers device `id` (in group `ddi`) and returns its target token.
    async fn register(&self, id: &str) -> String {
        let body = json!({"controller_id": id, "site": SITE, "group": "ddi"});
        let (status, target) =
            self.server.op_json(Method::POST, "/api/ddi/targets", Some(body)).await;
        assert_eq!(status, 201, "{target}");
        target["target_token"].as_str().expect("token").to_owned()
    }

    fn swupdate(&self, id: &str, token: &str, confirm: Option<u8>, extra: &str) -> Suricatta {
        self.swupdate_via(&self.server.url, id, token, confirm, extra)
    }

    /// SWUpdate reaching Central Command at `url` (a relay in between).
    fn swupdate_via(
        &self,
        url: &str,
        id: &str,
        token: &str,
        confirm: Option<u8>,
        extra: &str,
    ) -> Suricatta {
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).expect("device dir");
        Suricatta::start(&dir, &self.swu.cert, url, id, token, confirm, extra)
    }

    fn rebooted(&self, id: &str) -> PathBuf {
        self.dir.path().join(id).join("rebooted")
    }
}

const GATEWAY: &str = "gateway-token-for-the-ddi-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swupdate_installs_a_release_in_its_window_and_reports_after_the_reboot() {
    let lab = Lab::start().await;
    let server = &lab.server;
    let token = lab.register("dev1").await;
    let rollout = server.roll_out_now(2).await;

    // Outside its window (the default one opens at 02:00 UTC) nothing is offered.
    let poll = ddi(server, Method::GET, "dev1", &token).send().await.expect("poll");
    let poll: Value = poll.json().await.expect("json");
    assert_eq!(poll["config"]["polling"]["sleep"], "00:00:01");
    assert!(poll["_links"].get("deploymentBase").is_none(), "{poll}");
    lab.open_window().await;

    let client = lab.swupdate("dev1", &token, None, "");
    wait_device(server, "dev1", "rebooting", &client, |d| d["update"]["state"] == "rebooting")
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lab.rebooted("dev1").exists() {
        assert!(Instant::now() < deadline, "no post-update command:\n{}", client.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(std::fs::read(&lab.slot).expect("slot"), lab.swu.payload, "the file written");
    let attributes = device(server, "dev1").await["ddi"]["attributes"].clone();
    assert_eq!(attributes["board"], "sitecast-test", "{attributes}");
    drop(client);

    // After the "reboot" the bootloader says it works.
    let client = lab.swupdate("dev1", &token, Some(2), "");
    let done =
        wait_device(server, "dev1", "succeeded", &client, |d| d["update"]["state"] == "succeeded")
            .await;
    assert_eq!(done["installed_version"], 2);
    server.coordinator.tick().expect("tick");
    let rollout = server.rollout(rollout).await;
    assert_eq!(rollout["state"], "completed", "{rollout:#}");
    drop(client);
    let actions = server.audit_actions().await;
    assert!(actions.contains(&"release.swu".to_owned()), "{actions:?}");
}

/// One device fails after its reboot and the rollout pauses; another, still downloading, is
/// told to cancel when the operator rolls the rollout back, and acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_pauses_the_rollout_and_a_rollback_cancels_a_download() {
    let lab = Lab::start().await;
    let server = &lab.server;
    lab.open_window().await;
    let (fast, slow) = (lab.register("fast").await, lab.register("slow").await);
    let rollout = server.roll_out_now(2).await;

    // At 64 KB/s the 3 MiB artifact takes most of a minute: still downloading when the rollback
    // comes. (SWUpdate looks for a cancellation only now and then while it downloads.)
    let slow_client = lab.swupdate("slow", &slow, None, "-n 64k");
    wait_device(server, "slow", "downloading", &slow_client, |d| {
        d["update"]["state"] == "downloading"
    })
    .await;
    let fast_client = lab.swupdate("fast", &fast, None, "");
    wait_device(server, "fast", "rebooting", &fast_client, |d| d["update"]["state"] == "rebooting")
        .await;
    drop(fast_client);
    let fast_client = lab.swupdate("fast", &fast, Some(3), "");
    let failed =
        wait_device(server, "fast", "failed", &fast_client, |d| d["update"]["state"] == "failed")
            .await;
    assert_eq!(failed["installed_version"], 0, "{failed:#}");
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(rollout).await["state"], "paused");

    let path = format!("/api/rollouts/{rollout}/rollback");
    let (status, body) = server.op_json(Method::POST, &path, None).await;
    assert_eq!(status, 200, "{body}");
    let cancelled = wait_device(server, "slow", "cancelled", &slow_client, |d| {
        d["ddi"]["action"]["closed"] == true
    })
    .await;
    assert_eq!(cancelled["update"]["state"], "failed", "{cancelled:#}");
    let error = cancelled["update"]["error"].as_str().unwrap_or("");
    assert!(error.contains("cancelled"), "{cancelled:#}");
    let acknowledged = cancelled["ddi"]["last_feedback"].as_str().unwrap_or("");
    assert!(acknowledged.contains("cancel"), "{cancelled:#}");
    assert!(
        !lab.rebooted("slow").exists(),
        "the slow device finished installing:\n{}",
        slow_client.log()
    );
}

/// What a device that is not who it says, or says something malformed, gets; nothing it sends
/// changes stored state unless it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_foreign_actions_and_malformed_feedback_get_the_right_answers() {
    let lab = Lab::start().await;
    let server = &lab.server;
    lab.open_window().await;
    let token = lab.register("dev1").await;
    let other = lab.register("dev2").await;
    server.roll_out_now(2).await;
    let status = |r: reqwest::Response| r.status().as_u16();
    let get = |id: &str, token: &str| ddi(server, Method::GET, id, token).send();

    // No token, a wrong one, another device's, a wrong gateway token, an unknown scheme.
    let bare = server.http.get(format!("{}/DEFAULT/controller/v1/dev1", server.url));
    assert_eq!(status(bare.send().await.expect("send")), 401);
    assert_eq!(status(get("dev1", "guess").await.expect("send")), 401);
    assert_eq!(status(get("dev1", &other).await.expect("send")), 401);
    let gateway = |token: &str| {
        server
            .http
            .get(format!("{}/DEFAULT/controller/v1/dev9", server.url))
            .header("authorization", format!("GatewayToken {token}"))
            .send()
    };
    assert_eq!(status(gateway("guess").await.expect("send")), 401);
    let basic = server
        .http
        .get(format!("{}/DEFAULT/controller/v1/dev1", server.url))
        .header("authorization", format!("Bearer {token}"));
    assert_eq!(status(basic.send().await.expect("send")), 401);
    // Another tenant is not this server's; the tenant's case does not matter.
    let foreign = server
        .http
        .get(format!("{}/acme/controller/v1/dev1", server.url))
        .header("authorization", format!("TargetToken {token}"));
    assert_eq!(status(foreign.send().await.expect("send")), 404);
    let lower = server
        .http
        .get(format!("{}/default/controller/v1/dev1", server.url))
        .header("authorization", format!("TargetToken {token}"));
    assert_eq!(status(lower.send().await.expect("send")), 200);
    assert!(device(server, "dev9").await.is_null(), "refused devices are not registered");
    // A sitecast appliance's name is not free for a DDI device.
    Appliance::new(SITE, "taken", 0).checkin(server).await;
    let body = json!({"controller_id": "taken", "site": SITE});
    let (code, answer) = server.op_json(Method::POST, "/api/ddi/targets", Some(body)).await;
    assert_eq!((code, answer["code"].as_str()), (409, Some("identity_taken")), "{answer}");

    let href = deployment_offered(server, "dev1", &token).await;
    let action = href.rsplit('/').next().expect("id").to_owned();
    let before = device(server, "dev1").await;
    let feedback = |id: &str, action: &str, body: &'static str| {
        ddi(server, Method::POST, &format!("{id}/deploymentBase/{action}/feedback"), &token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    const CLOSED_OK: &str =
        r#"{"id":1,"status":{"execution":"closed","result":{"finished":"success"}}}"#;
    // An action it was never given, and one that is not a number.
    let (code, _) = error_code(feedback("dev1", "77", CLOSED_OK).await.expect("send")).await;
    assert_eq!(code, 404);
    let (code, _) = error_code(feedback("dev1", "x", CLOSED_OK).await.expect("send")).await;
    assert_eq!(code, 404);
    // Malformed bodies.
    for body in ["", "{", "[]", r#"{"status":{}}"#, r#"{"status":{"execution":7}}"#] {
        let (code, _) = error_code(feedback("dev1", &action, body).await.expect("send")).await;
        assert_eq!(code, 400, "{body:?}");
    }
    let mut after = device(server, "dev1").await;
    after["last_checkin"] = before["last_checkin"].clone();
    assert_eq!(after, before, "refused feedback changed the device");

    // What SWUpdate really sends on some failures: a raw newline inside a string.
    let raw = "{\"id\":1,\"status\":{\"execution\":\"closed\",\"result\":{\"finished\":\"failure\"},\"details\":[\"Installation failed\nbad image\"]}}";
    let response = feedback("dev1", &action, raw).await.expect("send");
    assert_eq!(response.status(), 200);
    let failed = device(server, "dev1").await;
    assert_eq!(failed["update"]["state"], "failed", "{failed:#}");
    assert!(failed["update"]["error"].as_str().unwrap_or("").contains("bad image"), "{failed:#}");
    // The same verdict again (its answer lost) is taken; another is refused.
    let response = feedback("dev1", &action, raw).await.expect("send");
    assert_eq!(response.status(), 200);
    let (code, _) = error_code(feedback("dev1", &action, CLOSED_OK).await.expect("send")).await;
    assert_eq!(code, 409);
    assert_eq!(device(server, "dev1").await["update"]["state"], "failed");
    // A failed action is not offered again (it would reinstall at every poll).
    let poll: Value = get("dev1", &token).await.expect("poll").json().await.expect("json");
    assert!(poll["_links"].get("deploymentBase").is_none(), "{poll}");

    // configData beyond its bound is kept in part, not refused (SWUpdate would repeat it).
    let data: serde_json::Map<String, Value> =
        (0..100).map(|i| (format!("k{i:03}"), json!(format!("v{i}")))).collect();
    let body = json!({"id": "", "status": {"execution": "closed", "result": {"finished": "success"}},
        "data": data});
    let response = ddi(server, Method::PUT, "dev1/configData", &token).json(&body).send().await;
    assert_eq!(response.expect("send").status(), 200);
    let attributes = device(server, "dev1").await["ddi"]["attributes"].clone();
    assert_eq!(attributes.as_object().map(|a| a.len()), Some(64), "{attributes}");

    // The artifact is only for devices offered it; the gateway token registers a new device.
    let artifact = |id: &str| {
        format!("{}/DEFAULT/controller/v1/{id}/softwaremodules/2/artifacts/update.swu", server.url)
    };
    let offered =
        server.http.head(artifact("dev1")).header("authorization", format!("TargetToken {token}"));
    assert_eq!(status(offered.send().await.expect("send")), 200);
    let response =
        server.http.get(artifact("dev2")).header("authorization", format!("TargetToken {other}"));
    assert_eq!(status(response.send().await.expect("send")), 404);
    assert_eq!(status(gateway(GATEWAY).await.expect("send")), 200);
    let registered = device(server, "dev9").await;
    assert_eq!(registered["ddi"]["controller_id"], "dev9", "{registered:#}");

    // Started without it, Central Command no longer takes the gateway token.
    let server = lab.server.restart_with(|config| config.ddi_gateway_token = None).await;
    let revoked = server
        .http
        .get(format!("{}/DEFAULT/controller/v1/dev9", server.url))
        .header("authorization", format!("GatewayToken {GATEWAY}"));
    assert_eq!(revoked.send().await.expect("send").status(), 401);
}

/// A TCP relay to `upstream` that cuts the connection carrying the first artifact download
/// once `cut` bytes of its answer have passed, and keeps the `Range` headers it sees.
struct CuttingRelay {
    url: String,
    ranges: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingRelay {
    async fn start(upstream: &str, cut: usize) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let cut_done = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&ranges);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect(&upstream).await.expect("upstream");
                tokio::spawn(relay(client, server, cut, Arc::clone(&cut_done), Arc::clone(&seen)));
            }
        });
        Self { url, ranges, task }
    }
}

impl Drop for CuttingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    cut: usize,
    cut_done: Arc<AtomicBool>,
    ranges: Arc<Mutex<Vec<String>>>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set when this connection asks for the artifact and no connection has been cut yet.
    let cutting = Arc::new(AtomicBool::new(false));
    let asking = Arc::clone(&cutting);
    let upward = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let text = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            if text.contains("get /") && text.contains("/artifacts/") {
                if !cut_done.swap(true, Ordering::SeqCst) {
                    asking.store(true, Ordering::SeqCst);
                }
                let range = text.lines().find(|l| l.starts_with("range:"));
                ranges.lock().expect("lock").extend(range.map(str::to_owned));
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downward = async move {
        let mut buf = vec![0u8; 64 << 10];
        let mut passed = 0;
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cutting.load(Ordering::SeqCst) {
                passed += n;
                if passed > cut {
                    return;
                }
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either side ending ends both: dropping the halves closes the connection.
    tokio::select! {
        () = upward => {},
        () = downward => {},
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_off_midway_resumes_with_a_range() {
    let lab = Lab::start().await;
    let server = &lab.server;
    lab.open_window().await;
    let token = lab.register("dev1").await;
    server.roll_out_now(2).await;
    let relay = CuttingRelay::start(&server.url, 1 << 20).await;

    let client = lab.swupdate_via(&relay.url, "dev1", &token, None, "");
    wait_device(server, "dev1", "rebooting", &client, |d| d["update"]["state"] == "rebooting")
        .await;
    let ranges = relay.ranges.lock().expect("lock").clone();
    let resumed_at: Vec<u64> = ranges
        .iter()
        .filter_map(|r| {
            r.trim_start_matches("range: bytes=").split('-').next()?.trim().parse().ok()
        })
        .collect();
    assert!(
        resumed_at.iter().any(|at| *at > 0),
        "no resumed download: {ranges:?}\n{}",
        client.log()
    );
    assert_eq!(std::fs::read(&lab.slot).expect("slot"), lab.swu.payload, "the file written");
}

/// A device that installs, reboots and is never heard of again fails like a silent sitecast
/// appliance: past the report deadline it counts as failed and the rollout pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_silent_after_its_reboot_counts_as_failed() {
    let lab = Lab::start().await;
    let server = &lab.server;
    lab.open_window().await;
    let token = lab.register("dev1").await;
    let rollout = server.roll_out_now(2).await;
    let href = deployment_offered(server, "dev1", &token).await;
    // What SWUpdate sends once every chunk is installed, before it runs its reboot command.
    let installed = json!({"id": 1, "time": "20261123T100000", "status": {
        "execution": "proceeding", "result": {"finished": "none", "progress": {"cnt": 1, "of": 1}},
        "details": ["All Chunks Installed."]}});
    let response = server
        .http
        .post(format!("{href}/feedback"))
        .header("authorization", format!("TargetToken {token}"))
        .json(&installed)
        .send()
        .await
        .expect("feedback");
    assert_eq!(response.status(), 200);
    assert_eq!(device(server, "dev1").await["update"]["state"], "rebooting");
    server.coordinator.tick().expect("tick");
    assert_eq!(server.rollout(rollout).await["state"], "in_progress");

    server.clock.advance(jiff::SignedDuration::from_hours(2));
    server.coordinator.tick().expect("tick");
    let silent = device(server, "dev1").await;
    assert_eq!(silent["update"]["state"], "failed", "{silent:#}");
    let rollout = server.rollout(rollout).await;
    assert_eq!(rollout["state"], "paused", "{rollout:#}");
}

/// A `.swu` published on its own is a release for DDI devices only: sitecast appliances are
/// never offered it, and it has no image or manifest to serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swu_published_alone_is_offered_to_ddi_devices_only() {
    let lab = Lab::start().await;
    let server = &lab.server;
    lab.open_window().await;
    let swu = std::fs::read(&lab.swu.path).expect("swu");
    let response = server
        .op(Method::PUT, "/api/releases/3/swu/gateway-3.swu?name=gw-2026.12")
        .body(swu.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 201);
    let record: Value = response.json().await.expect("json");
    assert_eq!(
        (record["version_name"].as_str(), record["size"].as_u64()),
        (Some("gw-2026.12"), Some(0))
    );
    assert_eq!(record["swu"]["size"], swu.len());
    // Once only: devices may already be downloading it.
    let again = server.op(Method::PUT, "/api/releases/3/swu/other.swu").body(swu).send().await;
    assert_eq!(error_code(again.expect("send")).await, (409, "conflict".to_owned()));
    let bad_name = server.op(Method::PUT, "/api/releases/4/swu/image.bin").body("x").send().await;
    assert_eq!(error_code(bad_name.expect("send")).await, (400, "invalid".to_owned()));

    let appliance = Appliance::new(SITE, "sitecast-1", 2);
    appliance.checkin(server).await;
    let token = lab.register("dev1").await;
    server.roll_out_now(3).await;
    let answer = appliance.checkin(server).await;
    assert!(!answer.update_available, "no image for sitecast");
    // Its site's DDI device is no LAN peer of it.
    assert_eq!(answer.site_members, Some(vec![appliance.id()]));
    let href = deployment_offered(server, "dev1", &token).await;
    let deployment = deployment_at(server, &href, &token).await;
    let artifact = &deployment["deployment"]["chunks"][0]["artifacts"][0];
    assert_eq!(artifact["filename"], "gateway-3.swu", "{deployment:#}");
    assert_eq!(deployment["deployment"]["chunks"][0]["version"], "gw-2026.12");
    for path in ["/api/releases/3/manifest", "/api/releases/3/image"] {
        let response = server.op(Method::GET, path).send().await.expect("get");
        assert_eq!(response.status(), 404, "{path}");
    }
}

/// The deployment behind a `deploymentBase` link.
async fn deployment_at(server: &TestServer, href: &str, token: &str) -> Value {
    let response = server
        .http
        .get(href)
        .header("authorization", format!("TargetToken {token}"))
        .send()
        .await
        .expect("deployment");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// What SWUpdate sends: `proceeding` with chunks installed of all, or `closed` with a result.
fn feedback_body(execution: &str, finished: &str, progress: Option<(u64, u64)>) -> Value {
    let mut result = json!({"finished": finished});
    if let Some((cnt, of)) = progress {
        result["progress"] = json!({"cnt": cnt, "of": of});
    }
    json!({"id": 1, "time": "20261123T100000",
        "status": {"execution": execution, "result": result, "details": ["from the test"]}})
}

/// A rollback brings devices that installed the release back to the previous one (which has a
/// `.swu` here), and lets a device that already installed it finish first: only a download
/// can be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_brings_devices_back_and_lets_an_installed_one_finish() {
    let lab = Lab::start().await;
    let server = &lab.server;
    lab.open_window().await;
    let put = server.op(Method::PUT, "/api/releases/1/swu/update-1.swu").body(vec![1u8; 4096]);
    assert_eq!(put.send().await.expect("upload").status(), 201);
    let (done, late) = (lab.register("done").await, lab.register("late").await);
    // A rollout of their group reaches them (and not an appliance outside it).
    Appliance::new(SITE, "sitecast-1", 1).checkin(server).await;
    let body = json!({"version": 2, "strategy": "immediate", "groups": ["ddi"]});
    let (status, created) = server.op_json(Method::POST, "/api/rollouts", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    let members = created["members"].as_object().expect("members");
    let keys: Vec<&String> = members.keys().collect();
    assert_eq!(keys, ["ddi:done", "ddi:late"], "{created:#}");
    let rollout = created["id"].as_u64().expect("id");
    let done_href = deployment_offered(server, "done", &done).await;
    send_feedback(server, &done_href, &done, &feedback_body("closed", "success", None)).await;
    assert_eq!(device(server, "done").await["installed_version"], 2);
    let late_href = deployment_offered(server, "late", &late).await;
    let installed = feedback_body("proceeding", "none", Some((1, 1)));
    send_feedback(server, &late_href, &late, &installed).await;
    assert_eq!(device(server, "late").await["update"]["state"], "rebooting");

    let path = format!("/api/rollouts/{rollout}/rollback");
    let (status, body) = server.op_json(Method::POST, &path, None).await;
    assert_eq!(status, 200, "{body}");
    // Installed and rebooting: offered until it closes the action, not cancelled.
    assert_eq!(deployment_offered(server, "late", &late).await, late_href);
    send_feedback(server, &late_href, &late, &feedback_body("closed", "success", None)).await;
    // Both go back to release 1, each by a new action, once.
    for (id, token, href) in [("done", &done, &done_href), ("late", &late, &late_href)] {
        let back = deployment_offered(server, id, token).await;
        assert_ne!(&back, href);
        let deployment = deployment_at(server, &back, token).await;
        let chunk = &deployment["deployment"]["chunks"][0];
        assert_eq!(chunk["artifacts"][0]["filename"], "update-1.swu", "{deployment:#}");
        send_feedback(server, &back, token, &feedback_body("closed", "success", None)).await;
        let device = device(server, id).await;
        assert_eq!(device["installed_version"], 1, "{device:#}");
        let poll = ddi(server, Method::GET, id, token).send().await.expect("poll");
        let poll: Value = poll.json().await.expect("json");
        let links = poll["_links"].as_object().expect("links");
        assert!(
            !links.contains_key("deploymentBase") && !links.contains_key("cancelAction"),
            "{poll}"
        );
    }
}
