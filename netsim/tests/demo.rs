//! The README's first command, run as a library call on a small image.

use sitecast_manifest::{ImageDigest, TrustedRoot};

#[test]
fn demo_signs_and_verifies_a_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut narration = Vec::new();
    let report = sitecast_netsim::demo::run(dir.path(), 4, &mut narration).expect("demo runs");
    let text = String::from_utf8(narration).expect("utf8");
    assert!(text.contains("verifies manifest and image: OK"), "{text}");
    assert!(text.contains("not newer than the installed version 2"), "{text}");

    // What the demo left behind verifies independently of the demo's own checks.
    let root = TrustedRoot::pin(&std::fs::read(dir.path().join("root.json")).expect("root"))
        .expect("root pins");
    let manifest = std::fs::read(&report.manifest).expect("manifest");
    let verified = root.verify_release(&manifest, jiff::Timestamp::now()).expect("verifies");
    let image = std::fs::File::open(dir.path().join("image-v2.raw")).expect("image");
    ImageDigest::check(image, &verified.release().image).expect("image matches");
    assert_eq!(report.image_bytes, 4 * 1024 * 1024);
}
