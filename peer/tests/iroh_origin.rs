//! The coordinator's stock iroh-blobs provider and our LAN client speak the same protocol: a
//! ranged get from the coordinator decodes with the same verifier as everything else.

mod common;

use std::net::SocketAddr;

use common::*;
use iroh_blobs::protocol::{GetRequest, Request};
use sitecast_iso::{BlobLayout, DecodedItem, ResponseDecoder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_serves_verified_ranges_over_iroh_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path()).await;
    let (image_path, info) = origin.publish(2, 3 * 1024 * 1024 + 5).await;
    let image = std::fs::read(&image_path).expect("image");
    let (id, addr) = origin.iroh[0].split_once('@').expect("id@addr");
    let id = iroh::PublicKey::from_bytes(&sitecast_manifest::decode_hex::<32>(id).expect("hex"))
        .expect("key");
    let addr: SocketAddr = addr.parse().expect("addr");

    let client = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .relay_mode(iroh::RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr("127.0.0.1:0".parse::<SocketAddr>().expect("addr"))
        .expect("bind addr")
        .bind()
        .await
        .expect("bind");
    let connection = client
        .connect(iroh::EndpointAddr::new(id).with_ip_addr(addr), iroh_blobs::ALPN)
        .await
        .expect("connect");
    let layout = BlobLayout::new(info.blake3, info.size);
    for groups in [0..layout.groups(), 5..9, layout.groups() - 1..layout.groups()] {
        let ranges = layout.chunk_ranges(groups.clone());
        let request = Request::Get(GetRequest::blob_ranges(
            iroh_blobs::Hash::from_bytes(*info.blake3.as_bytes()),
            ranges.clone(),
        ));
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        send.write_all(&postcard::to_stdvec(&request).expect("postcard")).await.expect("write");
        send.finish().expect("finish");
        let body = recv.read_to_end(1 << 24).await.expect("response");
        assert_eq!(
            body.len() as u64,
            layout.encoded_len(groups.clone()),
            "{groups:?}: the same bytes as the HTTP origin"
        );
        let mut received = 0;
        for item in ResponseDecoder::new(layout, &ranges, &body[..]).expect("header") {
            if let DecodedItem::Group(group) = item.expect("every group verifies") {
                let start = group.offset() as usize;
                assert_eq!(group.data(), &image[start..start + group.data().len()]);
                received += 1;
            }
        }
        assert_eq!(received, groups.end - groups.start);
    }
}
