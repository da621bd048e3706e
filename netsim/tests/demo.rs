//! The README's first command, small: it completes and reports every appliance updated.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_updates_every_appliance_with_about_one_origin_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = sitecast_netsim::demo::DemoOptions {
        work_dir: dir.path().join("demo"),
        appliances: 3,
        image_mib: 4,
        exe: env!("CARGO_BIN_EXE_sitecast-netsim").into(),
        time_limit: std::time::Duration::from_secs(180),
    };
    let mut narration = Vec::new();
    let report = sitecast_netsim::demo::run(&options, &mut narration)
        .await
        .unwrap_or_else(|e| panic!("demo failed: {e:#}\n{}", String::from_utf8_lossy(&narration)));
    let text = String::from_utf8_lossy(&narration);
    assert!(report.all_updated(2), "{text}");
    assert!(report.appliances.iter().all(|(_, _, slot, _)| slot == "B"), "{text}");
    let ratio = report.origin_bytes as f64 / report.image_bytes as f64;
    assert!(ratio <= 1.1, "origin sent {ratio:.2} copies:\n{text}");
    assert!(text.contains("summary"), "{text}");
}
